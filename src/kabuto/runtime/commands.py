"""runc's operations over persisted sandboxes: create, start, state, pause, resume, update, kill,
delete, exec, list, ps, run.

Each call is one short-lived process's worth of work: find the sandbox on disk, take its lock
(which serialises changes to its record), reconnect to VM and agent, act, persist, disconnect.
Each process claims an agent port of its own, so ``run`` and ``exec`` stream without the lock:
meanwhile other calls (``exec``, ``state``, ``kill``...) reach the same sandbox.
``run`` keeps everything in one process and removes the sandbox at the end.

A container joins an existing sandbox (a pod) when its annotations say so, as CRI does
(``Bundle.pod_sandbox_id``); otherwise each container gets a sandbox of its own, named after it.
Beside this file: streaming one process's stdio (streaming.py), the host process standing for a
detached container's or exec's process (detached.py, monitor.py) and the control socket of a
streaming ``run`` (control.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kabuto.errors import HypervisorError, KabutoError
from kabuto.processes import live_process
from kabuto.runtime.bundle import ContainerIdError, check_container_id, load_bundle, process_spec
from kabuto.runtime.cgroups_path import spec_cgroups_path
from kabuto.runtime.control import CONTROL_SOCKET, control_socket, kill_via_owner, parse_signal
from kabuto.runtime.detached import MONITOR_EXIT_TIMEOUT, end_monitor, spawn_monitor
from kabuto.runtime.host_cgroup import place_container, remove_container
from kabuto.runtime.sandbox import (
    DEFAULT_BOOT_TIMEOUT,
    INIT_EXEC_ID,
    SandboxError,
    VirtSandbox,
    create_sandbox_for,
    reap_abandoned,
)
from kabuto.runtime.state import ContainerRecord, SandboxRecord, StateError, StateStore
from kabuto.runtime.streaming import OUTPUT_DRAIN_TIMEOUT, ProcessIO, run_process

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
# A sandbox whose lock is held this long is busy streaming: `kill` goes through its owner.
BUSY_LOCK_TIMEOUT = 2.0


@dataclass
class RuntimeOptions:
    store: StateStore
    config_path: str | None = None
    hypervisor_name: str | None = None
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    #: runc's --systemd-cgroup: linux.cgroupsPath is slice:prefix:name
    systemd_cgroup: bool = False


# -- create / start ----------------------------------------------------------------------------
async def create(container_id: str, bundle_dir: str, options: RuntimeOptions, *,
                 host_cgroup_by_caller: bool = False) -> VirtSandbox:
    """``runc create``: the container exists, its process waits for ``start``. Returns the sandbox,
    still connected (the caller disconnects it, or keeps using it as ``run`` does).
    ``host_cgroup_by_caller``: the caller places the container's host side at its cgroupsPath."""
    check_container_id(container_id)
    bundle = load_bundle(bundle_dir)
    spec_cgroups_path(bundle.spec, systemd=options.systemd_cgroup)
    store = options.store
    pod = bundle.pod_sandbox_id
    if pod is not None:
        await reap_abandoned(store)
        with store.sandbox_lock(pod):
            sandbox = await VirtSandbox.attach(pod, store)
            try:
                await sandbox.connect()
                await sandbox.create_container(container_id, bundle,
                                               host_cgroup_by_caller=host_cgroup_by_caller)
            except BaseException:
                await sandbox.disconnect()
                raise
        return sandbox
    return await create_sandbox_for(container_id, bundle, store, config_path=options.config_path,
                                    hypervisor_name=options.hypervisor_name,
                                    boot_timeout=options.boot_timeout,
                                    host_cgroup_by_caller=host_cgroup_by_caller)


async def create_detached(container_id: str, bundle_dir: str, options: RuntimeOptions, *,
                          console_fd: int | None = None) -> int:
    """``runc create`` from the command line: as runc leaves the container's init, a host
    process (kabuto.runtime.monitor) stays standing for the container's process, a child of
    this one with this process's stdio (or, with ``console_fd``, a pty whose master went over
    the console socket). Returns its pid, for ``--pid-file``.

    With ``linux.cgroupsPath`` (and no sandbox_cgroup_only, which puts the whole sandbox in it),
    the container's host side is placed there as Kata places it (host_cgroup.place_container):
    the monitor, and for the sandbox's own container the VMM's vCPU threads."""
    bundle = load_bundle(bundle_dir)
    cgroups_path = spec_cgroups_path(bundle.spec, systemd=options.systemd_cgroup)
    sandbox = await create(container_id, bundle_dir, options, host_cgroup_by_caller=True)
    placed = bool(cgroups_path) and not sandbox.config.runtime.sandbox_cgroup_only
    threads: list[int] = []
    try:
        addresses = await sandbox.hypervisor.get_agent_sockets()
        if placed and container_id == sandbox.id:
            threads = await _vcpu_threads(sandbox)
    finally:
        await sandbox.disconnect()
    monitor: dict[str, Any] = {}
    try:
        monitor = await asyncio.to_thread(spawn_monitor, container_id, addresses, console_fd=console_fd)
        with options.store.sandbox_lock(sandbox.id):
            record = options.store.load(sandbox.id)
            container = record.containers[container_id]
            container.monitor = monitor
            if placed and cgroups_path:
                container.host_cgroup = place_container(
                    cgroups_path, bundle.spec.get("linux", {}).get("resources") or {},
                    [int(monitor["pid"])], threads)
            options.store.save(record)
    except BaseException:
        with contextlib.suppress(KabutoError):
            await delete(container_id, options, force=True)
        if monitor:
            await asyncio.to_thread(end_monitor, monitor, 0.0)
        raise
    return int(monitor["pid"])


async def _vcpu_threads(sandbox: VirtSandbox) -> list[int]:
    try:
        return sorted((await sandbox.hypervisor.get_thread_ids()).vcpus.values())
    except HypervisorError as exc:
        log.warning("sandbox %s: its vCPU threads are not known (%s): the host cgroup at "
                    "linux.cgroupsPath holds only the container's monitor", sandbox.id, exc)
        return []


@contextlib.asynccontextmanager
async def attached(container_id: str, options: RuntimeOptions, *, connect: bool = True,
                   lock_timeout: float | None = None, keep_agent: bool = False
                   ) -> AsyncIterator[VirtSandbox]:
    """The sandbox holding ``container_id``, locked and reconnected; disconnected afterwards.
    With ``keep_agent`` a body that succeeded leaves the agent connection to the caller (who
    closes it), so it can stream after the lock is released."""
    store = options.store
    await reap_abandoned(store)
    record = store.find_container(container_id)
    if record.owner and record.owned_by_live_process():
        owner = record.owner.get("name", "another process")
        raise SandboxError(f"container {container_id!r} is managed by {owner} (pid {record.owner['pid']}): "
                           "change it through containerd (ctr)")
    with store.sandbox_lock(record.id, *(() if lock_timeout is None else (lock_timeout,))):
        sandbox = await VirtSandbox.attach(record.id, store)
        try:
            if connect and sandbox.vm_alive:
                await sandbox.connect()
            yield sandbox
        except BaseException:
            if store.sandbox_dir(record.id).is_dir():
                await sandbox.disconnect()
            raise
        if store.sandbox_dir(record.id).is_dir():
            if keep_agent:
                await sandbox.save()
                await sandbox.release_vmm_control()
            else:
                await sandbox.disconnect()


async def start(container_id: str, options: RuntimeOptions) -> None:
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        await sandbox.start_container(container_id)


async def _require_vm(sandbox: VirtSandbox, container_id: str) -> None:
    if not sandbox.vm_alive:
        reason = sandbox.hypervisor.exit_reason() or "the VMM exited"
        await reap(sandbox)
        raise SandboxError(f"container {container_id!r}: its VM is gone ({reason}); "
                           "the container is stopped")


async def reap(sandbox: VirtSandbox) -> None:
    """A VMM that died: every container is stopped and the host resources go (the records stay
    until ``delete``, as runc keeps a stopped container's state)."""
    for container in sandbox.record.containers.values():
        container.status = "stopped"
    await sandbox.hypervisor.cleanup()
    await sandbox.release_host_resources()
    sandbox.store.save(sandbox.record)


# -- state / list / ps -------------------------------------------------------------------------
async def state(container_id: str, options: RuntimeOptions) -> dict[str, Any]:
    """OCI state JSON. A sandbox busy with another call (its lock held) reports what is recorded."""
    try:
        async with attached(container_id, options, lock_timeout=1.0) as sandbox:
            if sandbox.vm_alive:
                container = await sandbox.refresh_status(container_id)
                if container.status in ("running", "paused") and container.monitor \
                        and live_process(container.monitor) is None:
                    await _follow_monitor(sandbox, container_id)
            # also a VMM that died after attach found it alive: its host resources go now
            if not await sandbox.vmm_running():
                await reap(sandbox)
            return _oci_state(sandbox.record, container_id, await sandbox.hypervisor.get_pids())
    except KabutoError as exc:
        if isinstance(exc, ContainerIdError):
            raise
        record = options.store.find_container(container_id)
        return _oci_state(record, container_id, list(record.hypervisor_state.get("pids", [])))


async def _follow_monitor(sandbox: VirtSandbox, container_id: str) -> None:
    """The host process standing for the container is gone (SIGKILLed: it exits by itself only
    after the container's process did): as when runc's init is killed, the container's process
    is killed too, and ``state`` reports it stopped."""
    with contextlib.suppress(KabutoError):
        await sandbox.kill(container_id, signal.SIGKILL)
    with contextlib.suppress(KabutoError):
        await sandbox.wait_process(container_id, INIT_EXEC_ID, timeout=MONITOR_EXIT_TIMEOUT)
    await sandbox.refresh_status(container_id)


def _oci_state(record: SandboxRecord, container_id: str, pids: list[int]) -> dict[str, Any]:
    container = record.containers[container_id]
    status = container.status
    # the host process that stands for the container: its monitor (a detached `create`), else
    # (a streaming `run`) the VMM that holds it, as Kata reports its shim
    standing = live_process(container.monitor) if container.monitor else None
    pid = standing.pid if standing is not None else (pids[0] if pids else 0)
    state = {
        "ociVersion": OCI_VERSION,
        "id": container_id,
        "pid": pid if status != "stopped" else 0,
        "status": status,
        "bundle": container.bundle,
        "rootfs": container.rootfs.get("source", ""),
        "created": container.created,
        "owner": "",
        "sandbox": record.id,
    }
    if container.annotations:
        state["annotations"] = container.annotations
    return state


async def list_containers(options: RuntimeOptions) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    await reap_abandoned(options.store)
    for sandbox_id in options.store.sandbox_ids():
        with contextlib.suppress(KabutoError):
            record = options.store.load(sandbox_id)
            for container_id in record.containers:
                with contextlib.suppress(ContainerIdError):
                    rows.append(await state(container_id, options))
    return rows


async def ps(container_id: str, options: RuntimeOptions) -> list[int]:
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        return await sandbox.list_processes(container_id)


async def stats(container_id: str, options: RuntimeOptions) -> tuple[dict[str, Any], int | None]:
    """``runc events --stats``: one ``{"type": "stats", "id", "data"}`` object with what the
    guest reads from the container's cgroup (cpu in nanoseconds, as runc reports it); what the
    guest cannot tell is left out rather than made up. Also the count of processes the guest's
    OOM killer took in the container's cgroup (memory.events ``oom_kill``), None if unknown."""
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        if sandbox.container(container_id).status == "stopped":
            raise SandboxError(f"container {container_id!r} is not running")
        numbers = await sandbox.containers.stats_container(container_id)

    def present(**values: int | None) -> dict[str, int]:
        return {key: value for key, value in values.items() if value is not None}

    usec = {"total": numbers.cpu_usage_usec, "user": numbers.cpu_user_usec, "kernel": numbers.cpu_system_usec}
    data = {
        "cpu": {"usage": present(**{k: None if v is None else v * 1000 for k, v in usec.items()})},
        "memory": {"usage": present(usage=numbers.memory_usage_bytes, limit=numbers.memory_limit_bytes)},
        "pids": present(current=numbers.pids_current, limit=numbers.pids_limit),
    }
    return {"type": "stats", "id": container_id, "data": data}, numbers.memory_oom_kills


# -- pause / resume / update -------------------------------------------------------------------
async def pause(container_id: str, options: RuntimeOptions) -> None:
    """``runc pause``: the container's processes freeze (its VM keeps running)."""
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        await sandbox.pause_container(container_id)


async def resume(container_id: str, options: RuntimeOptions) -> None:
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        await sandbox.resume_container(container_id)


async def update(container_id: str, resources: dict[str, Any], options: RuntimeOptions) -> None:
    """``runc update -r``: ``resources`` is an OCI linux.resources object."""
    async with attached(container_id, options) as sandbox:
        await _require_vm(sandbox, container_id)
        await sandbox.update_container(container_id, resources)


# -- kill / delete -----------------------------------------------------------------------------
async def kill(container_id: str, signal_value: str | int, options: RuntimeOptions, *,
               all_processes: bool = False) -> None:
    number = parse_signal(signal_value)
    try:
        async with attached(container_id, options, lock_timeout=BUSY_LOCK_TIMEOUT) as sandbox:
            await _require_vm(sandbox, container_id)
            # no status poll first: the agent itself refuses a process that has exited
            await sandbox.kill(container_id, number, all_processes=all_processes)
    except StateError:
        # another call holds the sandbox's lock too long: ask the `run` that owns it to signal for us
        record = options.store.find_container(container_id)
        await kill_via_owner(options.store.sandbox_dir(record.id) / CONTROL_SOCKET, container_id, number,
                              all_processes)


async def delete(container_id: str, options: RuntimeOptions, *, force: bool = False) -> None:
    """``runc delete``: a stopped (or created) container goes; ``--force`` kills a running one.
    The sandbox's own container takes the whole sandbox with it (its VM stops). As runc,
    ``--force`` of a container that does not exist succeeds."""
    if force:
        try:
            options.store.find_container(container_id)
        except ContainerIdError:
            return
    async with attached(container_id, options) as sandbox:
        if sandbox.vm_alive:
            await sandbox.refresh_status(container_id)
        container = sandbox.container(container_id)
        others = [c for c in sandbox.record.containers if c != container_id]
        if container.status in ("running", "paused") and not force:
            raise SandboxError(f"cannot delete container {container_id} that is not stopped: "
                               f"{container.status}")
        if container_id == sandbox.id and others and not force:
            raise SandboxError(f"cannot delete sandbox container {container_id}: containers "
                               f"{', '.join(others)} still belong to it (use --force)")
        going = [sandbox.record.containers[c] for c in
                 [container_id, *(others if container_id == sandbox.id else [])]]
        # a stopped container's monitor hands over its last output and exits by itself
        await end_monitors([c for c in going if c.status == "stopped" and sandbox.vm_alive],
                           OUTPUT_DRAIN_TIMEOUT)
        if container_id == sandbox.id or (not sandbox.vm_alive and not others):
            await sandbox.destroy()
        elif sandbox.vm_alive:
            await sandbox.remove_container(container_id)
        else:
            await sandbox.release_container(container_id)
        # the others' process was killed with the container: their monitors exit now
        await end_monitors(going, MONITOR_EXIT_TIMEOUT)
        for gone in going:
            for busy in await asyncio.to_thread(remove_container, gone.host_cgroup):
                log.warning("container %s: host cgroup %s still holds a process; left in place",
                            gone.id, busy)


async def end_monitors(containers: list[ContainerRecord], grace: float) -> None:
    await asyncio.gather(*(asyncio.to_thread(end_monitor, c.monitor, grace) for c in containers if c.monitor))


async def exec_in(container_id: str, args: list[str], options: RuntimeOptions, io: ProcessIO, *,
                  env: list[str] | None = None, cwd: str | None = None, terminal: bool = False,
                  on_signal: Callable[[Callable[[int], None]], None] | None = None,
                  process: dict[str, Any] | None = None, **settings: Any) -> int:
    """``runc exec``, streamed by this process; its exit status. ``process`` is a whole OCI
    process (``--process FILE``); else ``args`` with the container's own settings and
    ``settings`` (process_spec's user, caps, additional_gids, no_new_privileges)."""
    async with attached(container_id, options, keep_agent=True) as sandbox:
        exec_id = await _start_exec(sandbox, container_id, args, process, env=env, cwd=cwd,
                                    terminal=terminal, **settings)
    # streaming changes no record: only this process's own agent port stays in use
    try:
        return await run_process(sandbox, container_id, exec_id, io, on_signal)
    finally:
        await sandbox.close()


async def exec_detached(container_id: str, args: list[str], options: RuntimeOptions, *,
                        console_fd: int | None = None, process: dict[str, Any] | None = None,
                        **settings: Any) -> int:
    """``runc exec --detach`` (or with ``--console-socket``): the process starts and a host
    process (kabuto.runtime.monitor) stays standing for it, a child of this one with this
    process's stdio or the pty sent over the console socket. Returns its pid."""
    async with attached(container_id, options, keep_agent=True) as sandbox:
        exec_id = await _start_exec(sandbox, container_id, args, process, **settings)
        addresses = await sandbox.hypervisor.get_agent_sockets()
    try:
        monitor = await asyncio.to_thread(spawn_monitor, container_id, addresses, exec_id=exec_id,
                                          console_fd=console_fd)
    except BaseException:
        with contextlib.suppress(KabutoError):
            await sandbox.kill(container_id, 9, exec_id=exec_id)
        raise
    finally:
        await sandbox.close()
    return int(monitor["pid"])


async def _start_exec(sandbox: VirtSandbox, container_id: str, args: list[str],
                      process: dict[str, Any] | None, **settings: Any) -> str:
    await _require_vm(sandbox, container_id)
    container = sandbox.container(container_id)
    if process is None:
        process = process_spec(args, container.process, **settings)
    exec_id = f"exec-{secrets.token_hex(4)}"
    await sandbox.exec_process(container_id, exec_id, process)
    return exec_id


async def run(container_id: str, bundle_dir: str, options: RuntimeOptions, io: ProcessIO,
              on_signal: Callable[[Callable[[int], None]], None] | None = None) -> int:
    """``runc run``: create, start, stream until exit, delete; returns the exit status."""
    sandbox = await create(container_id, bundle_dir, options)
    store = options.store
    try:
        with store.sandbox_lock(sandbox.id):
            await sandbox.start_container(container_id)
            await sandbox.release_vmm_control()
        # streaming holds only this process's agent port: other calls reach the sandbox meanwhile
        async with control_socket(sandbox):
            status = await run_process(sandbox, container_id, INIT_EXEC_ID, io, on_signal)
    finally:
        await _end_run(sandbox, container_id, store)
    return status


async def _end_run(sandbox: VirtSandbox, container_id: str, store: StateStore) -> None:
    """Its own sandbox goes with the container; a pod loses only this container."""
    try:
        with store.sandbox_lock(sandbox.id):
            # other processes may have changed the record while this one streamed
            sandbox.record = store.load(sandbox.id)
            if container_id == sandbox.id:
                await sandbox.destroy()
            else:
                try:
                    await sandbox.remove_container(container_id)
                finally:
                    await sandbox.disconnect()
    except ContainerIdError:
        # another process deleted the sandbox (or this container) meanwhile: only connections remain
        await sandbox.close()
    except StateError:
        # the lock stayed busy: the sandbox made for this run goes all the same
        if container_id != sandbox.id:
            await sandbox.close()
            raise
        await sandbox.destroy()
