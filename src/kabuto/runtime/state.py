"""Sandbox state on the host, so a later CLI call (another process) finds and drives the VM.

Layout under the state root (``/run/kabuto`` by default)::

    <root>/.lock                  flock held while ids are reserved or released
    <root>/<sandbox-id>/sandbox.json   SandboxRecord (with the hypervisor's save_state())
    <root>/<sandbox-id>/lock      flock serialising calls that talk to this sandbox's agent
    <root>/<sandbox-id>/shared/   the directory exported to the guest (rootfs mounts below)
    <root>/.vm/<vm-id>/           the hypervisor's VM directory (its jailer root is <root>/.vm); the
                                  VM id is the sandbox id, or the factory cache's for a VM it booted
    <root>/.cache/<vm-id>/        the factory cache's VMs (kabuto.runtime.factory.cache_store)

Container ids are unique across the root: a container that joins a sandbox is recorded in
that sandbox's file. Writes go through a temporary file and rename, so a crash never leaves
half a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kabuto.bounded import read_bounded
from kabuto.errors import KabutoError
from kabuto.processes import live_process
from kabuto.runtime.bundle import ContainerExistsError, ContainerIdError

DEFAULT_STATE_ROOT = Path("/run/kabuto")
STATE_ROOT_ENV = "KABUTO_STATE_ROOT"
RECORD_FILE = "sandbox.json"
MAX_RECORD_BYTES = 4 * 1024 * 1024
LOCK_TIMEOUT = 30.0
LOCK_POLL = 0.05


class StateError(KabutoError):
    """The persisted state cannot be read, written or locked."""


def default_state_root() -> Path:
    return Path(os.environ.get(STATE_ROOT_ENV) or DEFAULT_STATE_ROOT)


@dataclass
class ContainerRecord:
    id: str
    bundle: str
    #: created | running | stopped (OCI state)
    status: str = "created"
    created: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    #: OCI process of the container's first process (exec inherits user, env, cwd from it)
    process: dict[str, Any] = field(default_factory=dict)
    #: how its rootfs reached the guest: {"kind": "shared"|"block", "host_path", "mount", "device_id"...}
    rootfs: dict[str, Any] = field(default_factory=dict)
    exit_status: int | None = None
    #: the host process a detached ``create`` left standing for the container's process
    #: (kabuto.runtime.monitor): {"pid": ..., "create_time": ...}
    monitor: dict[str, Any] = field(default_factory=dict)
    #: its OCI linux.resources as created and updated since (what the VM is sized by)
    resources: dict[str, Any] = field(default_factory=dict)
    #: its host cgroup at linux.cgroupsPath, made by ``kabuto create`` (host_cgroup.place_container)
    host_cgroup: dict[str, Any] = field(default_factory=dict)


@dataclass
class SandboxRecord:
    id: str
    hypervisor_name: str
    config_path: str | None
    #: creating | ready | stopped
    status: str = "creating"
    hypervisor_state: dict[str, Any] = field(default_factory=dict)
    shared_dir: str = ""
    share_tag: str = ""
    #: the host network namespace the VMM runs in (a spec's network namespace path), or ""
    netns: str = ""
    #: the taps (and their tc redirects) made in that netns for the VM's NICs
    taps: list[str] = field(default_factory=list)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    #: the effective [runtime] and [agent] tables the sandbox was made with (after annotations)
    config: dict[str, Any] = field(default_factory=dict)
    #: the capabilities the runtime chose its strategies by (Capabilities.to_dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    #: the host cgroup its creator joined (sandbox_cgroup_only; kabuto.runtime.host_cgroup), or {}
    host_cgroup: dict[str, Any] = field(default_factory=dict)
    #: the long-lived process that manages this sandbox, if not the CLI (containerd's shim):
    #: {"name": ..., "pid": ..., "create_time": ...}
    owner: dict[str, Any] = field(default_factory=dict)
    #: the process creating the sandbox ({"pid", "create_time"}): a sandbox it left half made
    #: when it died (killed mid-create or mid-boot) is what the next command cleans up
    creator: dict[str, Any] = field(default_factory=dict)
    #: where its VM came from when not a cold boot: the factory source's name ("template")
    warm_start: str = ""

    def owned_by_live_process(self) -> bool:
        return live_process(self.owner) is not None

    def abandoned(self) -> bool:
        """Left half made: still creating, or holding no container yet, by a creator that died."""
        unfinished = self.status == "creating" or not self.containers
        return unfinished and bool(self.creator) and live_process(self.creator) is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxRecord:
        containers = {cid: ContainerRecord(**c) for cid, c in data.pop("containers", {}).items()}
        return cls(**data, containers=containers)


class StateStore:
    """Reads and writes sandbox records under one state root."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_root()

    @property
    def jailer_root(self) -> Path:
        return self.root / ".vm"

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def record_path(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / RECORD_FILE

    # -- locks -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def global_lock(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {self.root}: {exc.strerror}") from None
        with _flock(self.root / ".lock"):
            yield

    @contextlib.contextmanager
    def sandbox_lock(self, sandbox_id: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        directory = self.sandbox_dir(sandbox_id)
        if not directory.is_dir():
            raise ContainerIdError(f"sandbox {sandbox_id!r} does not exist")
        with _flock(directory / "lock", timeout):
            yield

    # -- records -----------------------------------------------------------------------------
    def sandbox_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{RECORD_FILE}"))

    def load(self, sandbox_id: str) -> SandboxRecord:
        path = self.record_path(sandbox_id)
        try:
            return SandboxRecord.from_dict(json.loads(read_bounded(path, MAX_RECORD_BYTES)))
        except FileNotFoundError:
            raise ContainerIdError(f"sandbox {sandbox_id!r} does not exist") from None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, TypeError) as exc:
            raise StateError(f"state file {path} is damaged: {exc}") from None

    def save(self, record: SandboxRecord) -> None:
        path = self.record_path(record.id)
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(record.to_json())
            os.replace(temporary, path)
        except OSError as exc:
            # a full filesystem leaves no half-written temporary behind (the record stays as it was)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise StateError(f"cannot write {path}: {exc.strerror}") from None

    def find_container(self, container_id: str) -> SandboxRecord:
        """The record of the sandbox holding ``container_id``; ContainerIdError if none does."""
        for sandbox_id in self.sandbox_ids():
            with contextlib.suppress(ContainerIdError, StateError):
                record = self.load(sandbox_id)
                if container_id in record.containers:
                    return record
        raise ContainerIdError(f"container {container_id!r} does not exist")

    def reserve(self, record: SandboxRecord, container_ids: list[str]) -> None:
        """Create the sandbox directory and record; refuse ids already in use anywhere."""
        with self.global_lock():
            for container_id in container_ids:
                if self._container_exists(container_id) or self.sandbox_dir(container_id).exists():
                    raise ContainerExistsError(f"container with id {container_id!r} already exists")
            directory = self.sandbox_dir(record.id)
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                raise ContainerExistsError(f"container with id {record.id!r} already exists") from None
            except OSError as exc:
                raise StateError(f"cannot create {directory}: {exc.strerror}") from None
            try:
                self.save(record)
            except StateError:
                # a full or read-only state filesystem: the reservation leaves nothing
                self._remove_locked(record.id)
                raise

    def add_container(self, sandbox_id: str, container: ContainerRecord) -> SandboxRecord:
        """Record a container joining an existing sandbox (id checked under the global lock)."""
        with self.global_lock():
            # the sandbox's own container shares its name with the sandbox directory
            taken_dir = container.id != sandbox_id and self.sandbox_dir(container.id).exists()
            if self._container_exists(container.id) or taken_dir:
                raise ContainerExistsError(f"container with id {container.id!r} already exists")
            record = self.load(sandbox_id)
            record.containers[container.id] = container
            self.save(record)
            return record

    def _container_exists(self, container_id: str) -> bool:
        try:
            self.find_container(container_id)
        except ContainerIdError:
            return False
        return True

    def remove(self, sandbox_id: str) -> None:
        """Forget a sandbox: its directory (which must hold no mounts any more) goes."""
        with self.global_lock():
            self._remove_locked(sandbox_id)

    def _remove_locked(self, sandbox_id: str) -> None:
        directory = self.sandbox_dir(sandbox_id)
        for path in (directory / RECORD_FILE, directory / f"{RECORD_FILE}.tmp", directory / "lock"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_empty_tree(directory)


def _remove_empty_tree(directory: Path) -> None:
    """rmdir bottom-up; never deletes files, so a mount still in place is never emptied (rmdir
    of a mount point fails with EBUSY)."""
    if not directory.is_dir() or directory.is_symlink():
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_empty_tree(child)
    with contextlib.suppress(OSError):
        directory.rmdir()


@contextlib.contextmanager
def _flock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"cannot open the lock {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateError(f"{path} is held by another kabuto process for more than {timeout:g}s") \
                        from None
                time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
