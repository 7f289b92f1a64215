"""What the cache daemon keeps on the host, so that nothing outlives a daemon killed with -9.

    <state root>/.cache/<vm-id>/owner.json   the daemon holding the VM (pid and start time)
    <state root>/.cache/<vm-id>/shared/      the directory the VM's shared-fs device exports
    <state root>/.vm/<vm-id>/                the VM directory (the hypervisor's, as for any VM)

A VM handed out loses its owner.json: its shared directory is then the sandbox's (its record's
shared_dir), removed when the sandbox ends. A VM whose owner.json names a dead daemon, and that
no sandbox record claims, is reaped by the next daemon or the next client that finds the
daemon gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from kabuto.bounded import read_bounded
from kabuto.errors import KabutoError
from kabuto.hypervisor.base import vm_dir_name
from kabuto.hypervisor.vmm_process import kill_processes_naming
from kabuto.processes import live_process, process_record
from kabuto.runtime.state import StateStore

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"
OWNER_FILE = "owner.json"
MAX_OWNER_BYTES = 4096


def cache_root(store: StateStore) -> Path:
    return store.root / CACHE_DIR


def entry_dir(store: StateStore, vm_id: str) -> Path:
    return cache_root(store) / vm_id


def shared_dir(store: StateStore, vm_id: str) -> Path:
    return entry_dir(store, vm_id) / "shared"


def make_entry(store: StateStore, vm_id: str) -> Path:
    """The entry of a VM about to boot, owned by this process; its shared directory."""
    entry = entry_dir(store, vm_id)
    entry.mkdir(parents=True, mode=0o700)
    (entry / OWNER_FILE).write_text(json.dumps({"vm_id": vm_id, "daemon": process_record(os.getpid())}))
    shared = shared_dir(store, vm_id)
    shared.mkdir(mode=0o700)
    return shared


def disown(store: StateStore, vm_id: str) -> None:
    """The VM is a sandbox's now: its entry keeps only the shared directory."""
    with contextlib.suppress(FileNotFoundError):
        (entry_dir(store, vm_id) / OWNER_FILE).unlink()


def remove_entry(store: StateStore, vm_id: str) -> None:
    """The entry of a VM that is gone (its shared directory holds no mounts: never handed out)."""
    entry = entry_dir(store, vm_id)
    with contextlib.suppress(FileNotFoundError):
        (entry / OWNER_FILE).unlink()
    # the cache root too once empty: a state root with no VM cached holds nothing of the cache
    for directory in (entry / "shared", entry, entry.parent):
        with contextlib.suppress(OSError):
            directory.rmdir()


def forget_shared(store: StateStore, shared: Path) -> None:
    """A sandbox that ran in a cached VM ends: its shared directory (emptied of mounts by the
    caller) and the entry around it go. Any other path is left alone."""
    if shared.parent.parent != cache_root(store) or shared.name != "shared":
        return
    remove_entry(store, shared.parent.name)


def claimed_vm_ids(store: StateStore) -> set[str]:
    """The VM ids sandbox records hold (a VM taken, recorded, its daemon not told yet)."""
    claimed = set()
    for sandbox_id in store.sandbox_ids():
        with contextlib.suppress(KabutoError):
            vm_id = store.load(sandbox_id).hypervisor_state.get("id")
            if vm_id:
                claimed.add(vm_id)
    return claimed


def _owner(entry: Path) -> dict[str, object] | None:
    try:
        owner = json.loads(read_bounded(entry / OWNER_FILE, MAX_OWNER_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # damaged: nobody can claim it
    return owner if isinstance(owner, dict) else {}


async def destroy_vm(store: StateStore, vm_id: str) -> list[int]:
    """Kill a cached VM by its directory (every process kabuto spawns for a VM names it) and
    remove its directory and entry; the pids killed."""
    vm_dir = store.jailer_root / vm_dir_name(vm_id)
    pids = await kill_processes_naming(vm_dir)
    if vm_dir.is_dir():
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)
    remove_entry(store, vm_id)
    return pids


async def reap_dead_cache(store: StateStore) -> list[str]:
    """Stop and remove every cached VM whose daemon died and that no sandbox claims; their ids."""
    root = cache_root(store)
    if not root.is_dir():
        return []
    claimed: set[str] | None = None
    reaped = []
    for entry in sorted(root.iterdir()):
        owner = _owner(entry)
        if owner is None:
            continue  # handed out: the sandbox's
        daemon = owner.get("daemon")
        if isinstance(daemon, dict) and live_process(daemon) is not None:
            continue
        if claimed is None:
            claimed = claimed_vm_ids(store)
        vm_id = entry.name
        if vm_id in claimed:
            disown(store, vm_id)
            continue
        pids = await destroy_vm(store, vm_id)
        log.warning("factory cache: VM %s was left by a cache daemon that died (pid %s): removed it%s",
                    vm_id, daemon.get("pid") if isinstance(daemon, dict) else "?",
                    f" and its processes {pids}" if pids else "")
        reaped.append(vm_id)
    return reaped
