"""ContainerService: sandboxes, containers and their processes, as the host asks.

Every size, id and path from a request is checked before use. Calls that wait
(WaitProcess, ReadStdout/ReadStderr, WriteStdin) give up shortly before the caller's
ttrpc deadline with DEADLINE_EXCEEDED, having consumed nothing, so the host can call again
without losing a byte or an exit status.

The handlers check a request and call the modules beside this one: processes.py (spawning,
watching, killing), cgroups.py, storage.py (mounts) and files.py (copy in and out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kabuto.guest import freshen
from kabuto.guest.containers import network
from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.cgroups import (
    cgroup_of,
    cgroup_stats,
    create_cgroup,
    lifted_limits,
    remove_cgroup,
    set_frozen,
    write_limits,
)
from kabuto.guest.containers.deadlines import poll_deadline, until_poll_deadline
from kabuto.guest.containers.files import GUEST_ROOT, Root, container_root, copy_in, copy_out
from kabuto.guest.containers.processes import (
    NAMESPACE_NAMES,
    Process,
    await_exec,
    kill_and_reap,
    pids_in,
    set_window_size,
    spawn,
    spawn_exec,
    wait_until_gone,
)
from kabuto.guest.containers.spec import (
    MAX_ID_LENGTH,
    MAX_PATH_LENGTH,
    MAX_SPEC_BYTES,
    ContainerSpec,
    SpecError,
    check_id,
    parse_process_json,
    parse_resources,
    parse_spec,
)
from kabuto.guest.containers.storage import mount_storage, unmount
from kabuto.guest.containers.streams import OutputStream, StreamClosed
from kabuto.protos import containers_pb2 as pb
from kabuto.ttrpc import Code, Method, RpcError, unary_method

log = logging.getLogger(__name__)

MAX_CONTAINERS = 256
MAX_PROCESSES_PER_CONTAINER = 1024
MAX_STORAGES = 64
MAX_IO_LENGTH = 1 << 20  # per ReadStdout/WriteStdin/CopyFile call: well below ttrpc's 4 MiB
MAX_TTY_SIZE = 0xFFFF


def check_path(value: str, what: str) -> str:
    if not value.startswith("/") or len(value) > MAX_PATH_LENGTH or "\0" in value:
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {value[:100]!r} must be an absolute path")
    if ".." in value.split("/"):
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {value[:100]!r} must not contain '..'")
    return value


def _ids(container_id: str, exec_id: str = "") -> None:
    try:
        check_id(container_id, "container id")
        if exec_id:
            check_id(exec_id, "exec id")
    except SpecError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None


@dataclass
class Container:
    id: str
    spec: ContainerSpec
    init: Process
    start_fd: int | None
    mnt_namespace: str
    cgroup_dir: Path | None
    rootfs_mount: str | None  # a storage this container mounted, unmounted on removal
    processes: dict[str, Process] = field(default_factory=dict)
    started: bool = False
    paused: bool = False

    @property
    def status(self) -> str:
        if self.init.exited:
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started else "created"


class ContainerService:
    """Handlers of kabuto.agent.v1.ContainerService."""

    def __init__(self, cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self.cgroup_root = cgroup_root
        self.containers: dict[str, Container] = {}
        self.storages: list[str] = []  # mount points, in mount order
        self.sandbox_created = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # create/remove of containers and the sandbox
        self._network_lock = asyncio.Lock()  # one change of the guest's network at a time

    def methods(self) -> dict[str, Method]:
        handlers: dict[str, tuple[Any, Callable[..., Awaitable[Any]]]] = {
            "CreateSandbox": (pb.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (pb.DestroySandboxRequest, self.destroy_sandbox),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "StartContainer": (pb.StartContainerRequest, self.start_container),
            "RemoveContainer": (pb.RemoveContainerRequest, self.remove_container),
            "ExecProcess": (pb.ExecProcessRequest, self.exec_process),
            "WaitProcess": (pb.WaitProcessRequest, self.wait_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "WriteStdin": (pb.WriteStdinRequest, self.write_stdin),
            "CloseStdin": (pb.CloseStdinRequest, self.close_stdin),
            "ReadStdout": (pb.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (pb.ReadStreamRequest, self.read_stderr),
            "TtyWinResize": (pb.TtyWinResizeRequest, self.tty_win_resize),
            "ListProcesses": (pb.ListProcessesRequest, self.list_processes),
            "StatsContainer": (pb.StatsContainerRequest, self.stats_container),
            "CopyFileIn": (pb.CopyFileInRequest, self.copy_file_in),
            "CopyFileOut": (pb.CopyFileOutRequest, self.copy_file_out),
            "PauseContainer": (pb.PauseContainerRequest, self.pause_container),
            "ResumeContainer": (pb.ResumeContainerRequest, self.resume_container),
            "UpdateContainer": (pb.UpdateContainerRequest, self.update_container),
            "UpdateInterface": (pb.UpdateInterfaceRequest, self.update_interface),
            "UpdateRoutes": (pb.UpdateRoutesRequest, self.update_routes),
            "AddARPNeighbors": (pb.AddARPNeighborsRequest, self.add_arp_neighbors),
        }
        return {name: unary_method(request, handler) for name, (request, handler) in handlers.items()}

    # --- lookups ----------------------------------------------------------------------

    def _container(self, container_id: str) -> Container:
        _ids(container_id)
        container = self.containers.get(container_id)
        if container is None:
            raise RpcError(Code.NOT_FOUND, f"container {container_id!r} does not exist")
        return container

    def _container_in(self, container_id: str, status: str, action: str) -> Container:
        """The container, if it is in the state ``action`` starts from."""
        container = self._container(container_id)
        if container.status != status:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"cannot {action} container {container.id!r}: it is {container.status}, not {status}",
            )
        return container

    def _process(self, container_id: str, exec_id: str) -> tuple[Container, Process]:
        _ids(container_id, exec_id)
        container = self._container(container_id)
        if not exec_id:
            return container, container.init
        process = container.processes.get(exec_id)
        if process is None:
            raise RpcError(
                Code.NOT_FOUND, f"process {exec_id!r} does not exist in container {container_id!r}"
            )
        return container, process

    def _forget_if_done(self, container: Container, process: Process) -> None:
        """An exec'd process is forgotten once it was waited for and its output read to the end."""
        if process.exec_id and process.waited and process.stdout.drained and process.stderr.drained:
            if container.processes.get(process.exec_id) is process:
                del container.processes[process.exec_id]
                process.close()

    # --- sandbox ----------------------------------------------------------------------

    async def create_sandbox(self, request: pb.CreateSandboxRequest) -> pb.CreateSandboxResponse:
        async with self._lock:
            if self.sandbox_created:
                raise RpcError(Code.ALREADY_EXISTS, "the sandbox already exists")
            if len(request.storages) > MAX_STORAGES:
                raise RpcError(Code.INVALID_ARGUMENT, f"more than {MAX_STORAGES} storages")
            if len(request.hostname) > 64 or "\0" in request.hostname:
                raise RpcError(Code.INVALID_ARGUMENT, "hostname longer than 64 characters")
            mount_points = [check_path(s.mount_point, "storage mount point") for s in request.storages]
            mounted: list[str] = []
            try:
                for storage, mount_point in zip(request.storages, mount_points, strict=True):
                    await mount_storage(storage, mount_point)
                    mounted.append(mount_point)
                if request.hostname:
                    sc.sethostname(request.hostname)
                # after the host's reseed of a restored guest: each sandbox's differs
                freshen.new_sandbox_boot_id()
            except BaseException:
                for mount_point in reversed(mounted):
                    unmount(mount_point)
                raise
            self.storages = mounted
            self.sandbox_created = True
            log.info("sandbox %s created with %d storages", request.sandbox_id or "-", len(mounted))
            return pb.CreateSandboxResponse()

    async def destroy_sandbox(self, request: pb.DestroySandboxRequest) -> pb.DestroySandboxResponse:
        async with self._lock:
            for container in list(self.containers.values()):
                await self._remove(container)
            for mount_point in reversed(self.storages):
                unmount(mount_point)
            self.storages = []
            self.sandbox_created = False
            return pb.DestroySandboxResponse()

    # --- containers -------------------------------------------------------------------

    async def create_container(self, request: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        _ids(request.container_id)
        async with self._lock:
            if request.container_id in self.containers:
                raise RpcError(Code.ALREADY_EXISTS, f"container {request.container_id!r} already exists")
            if len(self.containers) >= MAX_CONTAINERS:
                raise RpcError(Code.RESOURCE_EXHAUSTED, f"at most {MAX_CONTAINERS} containers per sandbox")
            try:
                spec = parse_spec(request.oci_spec_json)
            except SpecError as exc:
                raise RpcError(Code.INVALID_ARGUMENT, f"config.json: {exc}") from None
            rootfs_mount = None
            if request.HasField("rootfs") and request.rootfs.source:
                mount_point = check_path(request.rootfs.mount_point or spec.root_path, "rootfs mount point")
                if mount_point != spec.root_path:
                    raise RpcError(
                        Code.INVALID_ARGUMENT,
                        f"rootfs mount point {mount_point} differs from root.path {spec.root_path}",
                    )
                await mount_storage(request.rootfs, mount_point)
                rootfs_mount = mount_point
            elif not _is_dir(spec.root_path):
                raise RpcError(Code.NOT_FOUND, f"rootfs {spec.root_path} does not exist in the guest")
            cgroup_dir = None
            try:
                cgroup_dir = create_cgroup(self.cgroup_root, request.container_id, spec)
                container = await self._create(request.container_id, spec, cgroup_dir, rootfs_mount)
            except BaseException:
                remove_cgroup(cgroup_dir)
                if rootfs_mount is not None:
                    unmount(rootfs_mount)
                raise
            self.containers[container.id] = container
            log.info("container %s created, init pid %d", container.id, container.init.pid)
            return pb.CreateContainerResponse(pid=container.init.pid)

    async def _create(
        self, container_id: str, spec: ContainerSpec, cgroup_dir: Path | None, rootfs_mount: str | None
    ) -> Container:
        joined = self._open_joined(spec)
        pid_namespace_fd = joined.pop(sc.CLONE_NEWPID, None)
        try:
            start_r, start_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            _close_all([*joined.values(), pid_namespace_fd])
            raise
        try:
            process = await spawn(
                "",
                spec.process,
                container=spec,
                start_fd=start_r,
                cgroup_dir=cgroup_dir,
                namespace_fds=tuple(joined.items()),
                pid_namespace_fd=pid_namespace_fd,
                tasks=self._tasks,
            )
        except BaseException:
            os.close(start_w)
            raise
        finally:
            os.close(start_r)
            _close_all([*joined.values(), pid_namespace_fd])
        try:
            mnt_namespace = os.readlink(f"/proc/{process.pid}/ns/mnt")
        except OSError as exc:
            os.close(start_w)
            await kill_and_reap([process])
            process.close()
            raise RpcError(Code.INTERNAL, f"the container's init vanished before its start: {exc}") from None
        return Container(container_id, spec, process, start_w, mnt_namespace, cgroup_dir, rootfs_mount)

    def _open_joined(self, spec: ContainerSpec) -> dict[int, int]:
        """The namespaces (CLONE_NEW* flag -> fd) ``spec`` shares with other containers: their inits'."""
        opened: dict[int, int] = {}
        try:
            for flag, target_id in spec.joined:
                name = NAMESPACE_NAMES[flag]
                target = self.containers.get(target_id)
                if target is None:
                    raise RpcError(
                        Code.NOT_FOUND,
                        f"config.json: linux.namespaces: container {target_id!r}, whose {name} namespace"
                        " this one shares, does not exist",
                    )
                if target.init.exited:
                    raise RpcError(
                        Code.FAILED_PRECONDITION,
                        f"config.json: linux.namespaces: container {target_id!r}, whose {name} namespace"
                        " this one shares, is stopped",
                    )
                try:
                    opened[flag] = os.open(f"/proc/{target.init.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise RpcError(
                        Code.FAILED_PRECONDITION,
                        f"cannot open the {name} namespace of container {target_id!r}: {exc.strerror}",
                    ) from None
        except BaseException:
            _close_all(list(opened.values()))
            raise
        return opened

    async def start_container(self, request: pb.StartContainerRequest) -> pb.StartContainerResponse:
        container = self._container(request.container_id)
        if container.status != "created" or container.start_fd is None:
            raise RpcError(
                Code.FAILED_PRECONDITION, f"container {container.id!r} is {container.status}, not created"
            )
        start_fd, container.start_fd = container.start_fd, None
        try:
            os.write(start_fd, b"1")
        except OSError as exc:
            raise RpcError(
                Code.FAILED_PRECONDITION, f"container {container.id!r} init is gone: {exc}"
            ) from None
        finally:
            os.close(start_fd)
        container.started = True
        await await_exec(container.init)
        return pb.StartContainerResponse(pid=container.init.pid)

    async def remove_container(self, request: pb.RemoveContainerRequest) -> pb.RemoveContainerResponse:
        async with self._lock:
            await self._remove(self._container(request.container_id))
        return pb.RemoveContainerResponse()

    async def _remove(self, container: Container) -> None:
        if container.start_fd is not None:
            os.close(container.start_fd)
            container.start_fd = None
        processes = [container.init, *container.processes.values()]
        if container.paused and container.cgroup_dir is not None:
            # as runc: frozen processes run again to take their SIGKILL (a failure is logged,
            # the kill goes on: cgroup v2 delivers SIGKILL to frozen tasks as well)
            with contextlib.suppress(RpcError):
                await set_frozen(container.id, container.cgroup_dir, False)
        shared_pid_namespace = not container.spec.namespaces & sc.CLONE_NEWPID
        killed: list[int] = []
        if shared_pid_namespace:
            # No PID namespace whose end takes every process with it: find them by mount namespace.
            killed = pids_in(container.mnt_namespace)
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        await kill_and_reap(processes)
        if shared_pid_namespace:
            # the untracked ones (a shell's background jobs) die asynchronously: the rootfs they
            # hold is unmounted next, so wait (bounded) until none is left in the namespace
            await wait_until_gone(container.id, container.mnt_namespace, killed)
        for process in processes:
            process.close()
        remove_cgroup(container.cgroup_dir)
        if container.rootfs_mount is not None:
            unmount(container.rootfs_mount)
        self.containers.pop(container.id, None)
        log.info("container %s removed", container.id)

    # --- processes ----------------------------------------------------------------------

    async def exec_process(self, request: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        _ids(request.container_id)
        if not request.exec_id:
            raise RpcError(Code.INVALID_ARGUMENT, 'exec id must not be empty (the init process has "")')
        _ids(request.container_id, request.exec_id)
        container = self._container(request.container_id)
        if request.exec_id in container.processes:
            raise RpcError(
                Code.ALREADY_EXISTS, f"process {request.exec_id!r} already exists in {container.id!r}"
            )
        if len(container.processes) >= MAX_PROCESSES_PER_CONTAINER:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED, f"at most {MAX_PROCESSES_PER_CONTAINER} processes per container"
            )
        if container.status != "running":
            raise RpcError(Code.FAILED_PRECONDITION, f"cannot exec in a {container.status} container")
        try:
            spec = parse_process_json(request.process_json)
        except SpecError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"process: {exc}") from None
        process = await spawn_exec(
            request.exec_id,
            spec,
            container_id=container.id,
            init_pid=container.init.pid,
            namespaces=container.spec.entered,
            cgroup_dir=container.cgroup_dir,
            tasks=self._tasks,
        )
        container.processes[request.exec_id] = process
        await await_exec(process, container.processes)
        return pb.ExecProcessResponse(pid=process.pid)

    async def wait_process(self, request: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        container, process = self._process(request.container_id, request.exec_id)
        status = await until_poll_deadline(asyncio.shield(process.exit_status), "WaitProcess")
        process.waited = True
        self._forget_if_done(container, process)
        return pb.WaitProcessResponse(exit_status=status)

    async def signal_process(self, request: pb.SignalProcessRequest) -> pb.SignalProcessResponse:
        if not 1 <= request.signal < signal.NSIG:
            raise RpcError(Code.INVALID_ARGUMENT, f"signal {request.signal} is not a signal number")
        if request.all:
            container = self._container(request.container_id)
            for pid in pids_in(container.mnt_namespace):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, request.signal)
        else:
            _, process = self._process(request.container_id, request.exec_id)
            process.signal(request.signal)
        return pb.SignalProcessResponse()

    # --- stdio ----------------------------------------------------------------------------

    async def write_stdin(self, request: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        _, process = self._process(request.container_id, request.exec_id)
        if len(request.data) > MAX_IO_LENGTH:
            raise RpcError(Code.INVALID_ARGUMENT, f"at most {MAX_IO_LENGTH} bytes per WriteStdin")
        if process.stdin is None:
            raise RpcError(Code.FAILED_PRECONDITION, "stdin is closed")
        try:
            written = await process.stdin.write(request.data, poll_deadline())
        except StreamClosed as exc:
            raise RpcError(Code.FAILED_PRECONDITION, str(exc)) from None
        return pb.WriteStdinResponse(written=written)

    async def close_stdin(self, request: pb.CloseStdinRequest) -> pb.CloseStdinResponse:
        _, process = self._process(request.container_id, request.exec_id)
        if process.stdin is not None:
            process.stdin.close()
        return pb.CloseStdinResponse()

    async def read_stdout(self, request: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._read(request, "stdout")

    async def read_stderr(self, request: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._read(request, "stderr")

    async def _read(self, request: pb.ReadStreamRequest, which: str) -> pb.ReadStreamResponse:
        container, process = self._process(request.container_id, request.exec_id)
        max_len = min(request.max_len or MAX_IO_LENGTH, MAX_IO_LENGTH)
        stream: OutputStream = getattr(process, which)
        data = await until_poll_deadline(stream.read(max_len), f"Read{which.capitalize()}")
        if not data:
            self._forget_if_done(container, process)
        return pb.ReadStreamResponse(data=data)

    async def tty_win_resize(self, request: pb.TtyWinResizeRequest) -> pb.TtyWinResizeResponse:
        _, process = self._process(request.container_id, request.exec_id)
        if process.tty_fd is None:
            raise RpcError(
                Code.FAILED_PRECONDITION, "the process has no terminal (process.terminal is false)"
            )
        if request.rows > MAX_TTY_SIZE or request.cols > MAX_TTY_SIZE:
            raise RpcError(Code.INVALID_ARGUMENT, f"terminal size {request.rows}x{request.cols} is too large")
        set_window_size(process.tty_fd, request.rows, request.cols)
        return pb.TtyWinResizeResponse()

    # --- inspection ---------------------------------------------------------------------------

    async def list_processes(self, request: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        container = self._container(request.container_id)
        return pb.ListProcessesResponse(pids=pids_in(container.mnt_namespace))

    async def stats_container(self, request: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        container = self._container(request.container_id)
        if container.cgroup_dir is None:
            return pb.StatsContainerResponse()
        return pb.StatsContainerResponse(**cgroup_stats(container.cgroup_dir))

    # --- pause, resume, update ---------------------------------------------------------------

    async def pause_container(self, request: pb.PauseContainerRequest) -> pb.PauseContainerResponse:
        async with self._lock:
            container = self._container_in(request.container_id, "running", "pause")
            try:
                await set_frozen(container.id, container.cgroup_dir, True)
            except BaseException:
                # a half-frozen container is neither paused nor running: back to running
                with contextlib.suppress(RpcError):
                    await set_frozen(container.id, container.cgroup_dir, False)
                raise
            container.paused = True
            log.info("container %s paused", container.id)
        return pb.PauseContainerResponse()

    async def resume_container(self, request: pb.ResumeContainerRequest) -> pb.ResumeContainerResponse:
        async with self._lock:
            container = self._container_in(request.container_id, "paused", "resume")
            await set_frozen(container.id, container.cgroup_dir, False)
            container.paused = False
            log.info("container %s resumed", container.id)
        return pb.ResumeContainerResponse()

    async def update_container(self, request: pb.UpdateContainerRequest) -> pb.UpdateContainerResponse:
        async with self._lock:
            container = self._container(request.container_id)
            if container.status == "stopped":
                raise RpcError(
                    Code.FAILED_PRECONDITION, f"cannot update container {container.id!r}: it is stopped"
                )
            if len(request.resources) > MAX_SPEC_BYTES:
                raise RpcError(Code.INVALID_ARGUMENT, f"resources: more than {MAX_SPEC_BYTES} bytes")
            try:
                raw = json.loads(request.resources or b"{}")
                files = {**lifted_limits(raw), **dict(parse_resources(raw).files)}
            except (ValueError, RecursionError) as exc:
                raise RpcError(Code.INVALID_ARGUMENT, f"resources: invalid JSON: {exc}") from None
            except SpecError as exc:
                raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
            write_limits(cgroup_of(container.id, container.cgroup_dir, "update"), files, "")
            log.info("container %s updated: %s", container.id, ", ".join(files))
        return pb.UpdateContainerResponse()

    # --- the pod's network ---------------------------------------------------------------------

    async def update_interface(self, request: pb.UpdateInterfaceRequest) -> pb.Interface:
        async with self._network_lock:
            interface = await network.update_interface(request)
        log.info("interface %s (%s) configured: %d addresses", interface.name, interface.mac,
                 len(interface.addresses))
        return interface

    async def update_routes(self, request: pb.UpdateRoutesRequest) -> pb.UpdateRoutesResponse:
        async with self._network_lock:
            response = await network.update_routes(request)
        log.info("routes: %d asked, %d on those devices now", len(request.routes), len(response.routes))
        return response

    async def add_arp_neighbors(self, request: pb.AddARPNeighborsRequest) -> pb.AddARPNeighborsResponse:
        async with self._network_lock:
            return await network.add_arp_neighbors(request)

    # --- files ------------------------------------------------------------------------------------

    def _file_root(self, container_id: str) -> Root:
        """Where a copied path resolves: the guest's root, or a running container's."""
        if not container_id:
            return GUEST_ROOT
        container = self._container(container_id)
        if container.init.exited:
            raise RpcError(Code.FAILED_PRECONDITION, f"container {container_id!r} is stopped")
        return container_root(container.init.pid)

    async def copy_file_in(self, request: pb.CopyFileInRequest) -> pb.CopyFileInResponse:
        if len(request.data) > MAX_IO_LENGTH:
            raise RpcError(Code.INVALID_ARGUMENT, f"at most {MAX_IO_LENGTH} bytes per CopyFileIn")
        if request.mode > 0o7777:
            raise RpcError(Code.INVALID_ARGUMENT, f"mode {request.mode:o} is not a permission mode")
        check_path(request.path, "path")
        root = self._file_root(request.container_id)
        copy_in(root, request.path, request.data, request.offset, request.mode)
        return pb.CopyFileInResponse()

    async def copy_file_out(self, request: pb.CopyFileOutRequest) -> pb.CopyFileOutResponse:
        max_len = min(request.max_len or MAX_IO_LENGTH, MAX_IO_LENGTH)
        check_path(request.path, "path")
        data, info = copy_out(self._file_root(request.container_id), request.path, request.offset, max_len)
        return pb.CopyFileOutResponse(data=data, size=info.st_size, mode=stat.S_IMODE(info.st_mode))


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


__all__ = ["MAX_ID_LENGTH", "ContainerService"]
