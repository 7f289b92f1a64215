"""The ``containerd.task.v2.Task`` service: containerd's tasks, run in this shim's sandbox VM.

The first task created makes the sandbox (boots the VM); tasks of the same pod join it. Every
process (a task's init, or an exec) is supervised (kabuto.shim.supervision): its stdio pumped
between containerd's FIFOs and the agent, a waiter that records its exit and tells containerd.
The pid containerd sees for a task or exec is the VMM's, as in Kata: guest pids mean nothing on
the host; ``Pids`` lists the guest's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError, Message

from kabuto.agent.containers import ContainerCallError
from kabuto.errors import AnnotationError, ConfigError, KabutoError
from kabuto.processes import process_record
from kabuto.protos import containerd_cgroups_v2_pb2 as cgroups_pb
from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_runtimeoptions_pb2 as options_pb
from kabuto.protos import containerd_shim_pb2 as pb
from kabuto.protos import containerd_task_types_pb2 as types_pb
from kabuto.runtime.bundle import (
    Bundle,
    BundleError,
    ContainerExistsError,
    ContainerIdError,
    check_container_id,
    load_bundle,
)
from kabuto.runtime.sandbox import INIT_EXEC_ID, VirtSandbox, create_sandbox_for
from kabuto.runtime.state import StateStore
from kabuto.shim import mounts
from kabuto.shim.events import Publisher
from kabuto.shim.stdio import ProcessStdio, StdioError
from kabuto.shim.supervision import LOST_EXIT_STATUS, Process, Supervisor, describe, now, release
from kabuto.ttrpc import Code, Method, RpcError, unary_method

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"
# a task deleted or killed before it started ends as SIGKILL'd, as runc's does
KILLED_EXIT_STATUS = 128 + 9
CLOSE_IO_TIMEOUT = 30.0
MAX_PID = 2**31 - 1
MAX_PROCESS_SPEC_BYTES = 1024 * 1024


@dataclass
class Task:
    id: str
    bundle: Bundle
    init: Process
    mounted_rootfs: Path | None
    execs: dict[str, Process] = field(default_factory=dict)


def _rpc_error(exc: KabutoError) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, ContainerCallError):
        return RpcError(exc.code, exc.message)
    if isinstance(exc, ContainerExistsError):
        return RpcError(Code.ALREADY_EXISTS, str(exc))
    if isinstance(exc, ContainerIdError):
        return RpcError(Code.NOT_FOUND, str(exc))
    if isinstance(exc, BundleError | ConfigError | AnnotationError | StdioError):
        return RpcError(Code.INVALID_ARGUMENT, str(exc))
    return RpcError(Code.UNKNOWN, str(exc))


def _handler(method: Callable[[Any], Awaitable[Message]]) -> Callable[[Any], Awaitable[Message]]:
    """Runtime errors become ttrpc statuses containerd maps to its own (NotFound, ...)."""
    async def handle(request: Any) -> Message:
        log.debug("%s %s", method.__name__, text_format.MessageToString(request, as_one_line=True)[:500])
        try:
            return await method(request)
        except KabutoError as exc:
            log.warning("%s: %s", method.__name__, exc)
            raise _rpc_error(exc) from None
    handle.__name__ = method.__name__
    return handle


class TaskService:
    def __init__(self, store: StateStore, publisher: Publisher, on_idle: Callable[[], None]) -> None:
        self.store = store
        self.publisher = publisher
        self._on_idle = on_idle
        self.sandbox: VirtSandbox | None = None
        self.supervisor = Supervisor(self._sandbox, publisher, self._vmm_pid)
        self.tasks: dict[str, Task] = {}
        self._lock = asyncio.Lock()
        # Creates under way, by task id: containerd gives up on one by deleting it (or shutting
        # the shim down) while it still boots; cancelling it makes it undo what it made.
        self._creating: dict[str, asyncio.Task[Any]] = {}
        self._abandoned: set[str] = set()

    def methods(self) -> dict[str, Method]:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (pb.StateRequest, self.state),
            "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start),
            "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids),
            "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill),
            "Exec": (pb.ExecProcessRequest, self.exec),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update),
            "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats),
            "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }
        return {name: unary_method(request, _handler(handler)) for name, (request, handler) in table.items()}

    # -- lookups -----------------------------------------------------------------------------
    def _task(self, task_id: str) -> Task:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise RpcError(Code.NOT_FOUND, f"task {task_id!r} not found") from None

    def _process(self, task_id: str, exec_id: str) -> Process:
        task = self._task(task_id)
        if not exec_id:
            return task.init
        try:
            return task.execs[exec_id]
        except KeyError:
            raise RpcError(Code.NOT_FOUND, f"exec {exec_id!r} of task {task_id!r} not found") from None

    def _sandbox(self) -> VirtSandbox:
        if self.sandbox is None:
            raise RpcError(Code.FAILED_PRECONDITION, "this shim has no sandbox VM")
        return self.sandbox

    async def _vmm_pid(self) -> int:
        if self.sandbox is None:
            return 0
        pids = await self.sandbox.hypervisor.get_pids()
        return pids[0] if pids else 0

    # -- create / start ----------------------------------------------------------------------
    async def create(self, request: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        try:
            check_container_id(request.id)
        except ContainerIdError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        if request.checkpoint:
            raise RpcError(Code.UNIMPLEMENTED, "Kabuto cannot restore a task from a checkpoint")
        if request.id in self._creating:
            raise RpcError(Code.ALREADY_EXISTS, f"task {request.id!r} is being created")
        current = asyncio.current_task()
        assert current is not None
        self._creating[request.id] = current
        try:
            return await self._create(request)
        except asyncio.CancelledError:
            if request.id not in self._abandoned:
                raise  # containerd's connection went mid-create: nobody hears the answer
            # undone on containerd's request: it still gets an answer on this call
            raise RpcError(Code.CANCELLED, f"task {request.id!r}: creation abandoned by containerd") from None
        finally:
            del self._creating[request.id]
            self._abandoned.discard(request.id)
            self._go_if_unneeded()

    async def _create(self, request: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        async with self._lock:
            if request.id in self.tasks:
                raise RpcError(Code.ALREADY_EXISTS, f"task {request.id!r} already exists")
            bundle_dir = Path(request.bundle)
            mounted = await mounts.mount_rootfs(list(request.rootfs), bundle_dir / "rootfs")
            stdio: ProcessStdio | None = None
            try:
                bundle = load_bundle(bundle_dir)
                stdio = ProcessStdio.open(request.stdin, request.stdout, request.stderr, request.terminal)
                await self._create_container(request, bundle)
            except BaseException:
                if stdio is not None:
                    stdio.close()
                if mounted is not None:
                    await mounts.unmount(mounted)
                raise
            task = Task(request.id, bundle, Process(request.id, INIT_EXEC_ID, stdio), mounted)
            self.tasks[request.id] = task
        pid = await self._vmm_pid()
        self.publisher.publish(events_pb.TaskCreate(
            container_id=request.id, bundle=request.bundle, rootfs=request.rootfs, pid=pid,
            io=events_pb.TaskIO(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                                terminal=request.terminal)))
        return pb.CreateTaskResponse(pid=pid)

    async def _create_container(self, request: pb.CreateTaskRequest, bundle: Bundle) -> None:
        if self.sandbox is not None:
            await self.sandbox.create_container(request.id, bundle)
            return
        if bundle.pod_sandbox_id is not None:
            raise RpcError(Code.FAILED_PRECONDITION,
                           f"container {request.id!r} belongs to sandbox {bundle.pod_sandbox_id!r}, "
                           "which this shim does not run")
        # the kabuto CLI sees this sandbox under the same state root: it reads, the shim acts
        owner = {"name": "containerd-shim-kabuto-v2", **process_record(os.getpid())}
        self.sandbox = await create_sandbox_for(request.id, bundle, self.store,
                                                config_path=_config_path(request.options), owner=owner)

    async def start(self, request: pb.StartRequest) -> pb.StartResponse:
        process = self._process(request.id, request.exec_id)
        sandbox = self._sandbox()
        if process.status != types_pb.CREATED:
            status = types_pb.Status.Name(process.status).lower()
            raise RpcError(Code.FAILED_PRECONDITION, f"{describe(process)} cannot start: it is {status}")
        try:
            if process.exec_id:
                assert process.spec is not None
                await sandbox.exec_process(process.container_id, process.exec_id, process.spec)
            else:
                await sandbox.start_container(process.container_id)
        except BaseException:
            # never ran: containerd's side of the FIFOs sees the end now, and Wait returns
            self.supervisor.exited(process, LOST_EXIT_STATUS)
            raise
        process.status = types_pb.RUNNING
        if process.stdio.stdin_fd is None:  # no stdin from containerd: the process reads end of file
            with contextlib.suppress(KabutoError):
                await sandbox.close_stdin(process.container_id, process.exec_id)
        self.supervisor.supervise(process)
        pid = await self._vmm_pid()
        if process.exec_id:
            self.publisher.publish(events_pb.TaskExecStarted(container_id=process.container_id,
                                                             exec_id=process.exec_id, pid=pid))
        else:
            self.publisher.publish(events_pb.TaskStart(container_id=process.container_id, pid=pid))
        return pb.StartResponse(pid=pid)

    # -- exec --------------------------------------------------------------------------------
    async def exec(self, request: pb.ExecProcessRequest) -> Empty:
        task = self._task(request.id)
        if not request.exec_id:
            raise RpcError(Code.INVALID_ARGUMENT, "exec id must not be empty")
        if request.exec_id in task.execs:
            raise RpcError(Code.ALREADY_EXISTS,
                           f"exec {request.exec_id!r} of task {request.id!r} already exists")
        if task.init.status != types_pb.RUNNING:
            raise RpcError(Code.FAILED_PRECONDITION, f"task {request.id!r} is not running")
        spec = _process_spec(request.spec)
        stdio = ProcessStdio.open(request.stdin, request.stdout, request.stderr, request.terminal)
        task.execs[request.exec_id] = Process(request.id, request.exec_id, stdio, spec=spec)
        self.publisher.publish(events_pb.TaskExecAdded(container_id=request.id, exec_id=request.exec_id))
        return Empty()

    # -- signals, terminal, stdin ------------------------------------------------------------
    async def kill(self, request: pb.KillRequest) -> Empty:
        process = self._process(request.id, request.exec_id)
        if process.status == types_pb.STOPPED:
            raise RpcError(Code.NOT_FOUND, f"{describe(process)}: process already finished")
        await self._sandbox().kill(process.container_id, request.signal, exec_id=process.exec_id,
                                   all_processes=request.all)
        if process.status == types_pb.CREATED and not process.exec_id and not process.tasks:
            # the created task's process waited for Start; its end is reported like any other
            self.supervisor.watch_exit(process, [])
        return Empty()

    async def resize_pty(self, request: pb.ResizePtyRequest) -> Empty:
        process = self._process(request.id, request.exec_id)
        if process.status == types_pb.RUNNING:
            await self._sandbox().resize_terminal(process.container_id, process.exec_id,
                                                  request.height, request.width)
        return Empty()

    async def close_io(self, request: pb.CloseIORequest) -> Empty:
        process = self._process(request.id, request.exec_id)
        if not request.stdin:
            return Empty()
        # the stdin pump hands over what containerd wrote before closing, then closes; a
        # process not started yet gets it all once it starts
        process.stdin_closing.set()
        # asyncio.wait, not an await of the pump: the pump of a process that exited meanwhile is
        # cancelled, and CRI closes an exec's stdin only after its exit (a CancelledError here left
        # CloseIO unanswered, and CRI's exec hung on it)
        pump = process.stdin_pump
        if pump is not None:
            await asyncio.wait([pump], timeout=CLOSE_IO_TIMEOUT)
            if not pump.done():
                raise RpcError(Code.DEADLINE_EXCEEDED, f"{describe(process)}: stdin not closed within "
                                                       f"{CLOSE_IO_TIMEOUT:.0f} s")
        return Empty()

    # -- state -------------------------------------------------------------------------------
    async def state(self, request: pb.StateRequest) -> pb.StateResponse:
        task = self._task(request.id)
        process = self._process(request.id, request.exec_id)
        stdio = process.stdio
        response = pb.StateResponse(
            id=request.id, exec_id=request.exec_id, bundle=str(task.bundle.path), pid=await self._vmm_pid(),
            status=process.status, stdin=stdio.stdin_path, stdout=stdio.stdout_path,
            stderr=stdio.stderr_path, terminal=stdio.terminal, exit_status=process.exit_status)
        if process.exited_at is not None:
            response.exited_at.CopyFrom(process.exited_at)
        return response

    async def wait(self, request: pb.WaitRequest) -> pb.WaitResponse:
        process = self._process(request.id, request.exec_id)
        await process.exited.wait()
        return pb.WaitResponse(exit_status=process.exit_status, exited_at=process.exited_at)

    async def pids(self, request: pb.PidsRequest) -> pb.PidsResponse:
        self._task(request.id)
        pids = await self._sandbox().list_processes(request.id)
        valid = [pid for pid in pids if 0 < pid <= MAX_PID]
        return pb.PidsResponse(processes=[types_pb.ProcessInfo(pid=pid) for pid in valid])

    async def stats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        self._task(request.id)
        stats = await self._sandbox().containers.stats_container(request.id)
        metrics = cgroups_pb.Metrics(
            pids=cgroups_pb.PidsStat(current=_counter(stats.pids_current), limit=_counter(stats.pids_limit)),
            cpu=cgroups_pb.CPUStat(usage_usec=_counter(stats.cpu_usage_usec),
                                   user_usec=_counter(stats.cpu_user_usec),
                                   system_usec=_counter(stats.cpu_system_usec)),
            memory=cgroups_pb.MemoryStat(usage=_counter(stats.memory_usage_bytes),
                                         usage_limit=_counter(stats.memory_limit_bytes)))
        return pb.StatsResponse(stats=AnyMessage(type_url=metrics.DESCRIPTOR.full_name,
                                                 value=metrics.SerializeToString()))

    # -- pause / resume / update / checkpoint -------------------------------------------------
    async def pause(self, request: pb.PauseRequest) -> Empty:
        return await self._freeze(request.id, frozen=True)

    async def resume(self, request: pb.ResumeRequest) -> Empty:
        return await self._freeze(request.id, frozen=False)

    async def _freeze(self, task_id: str, frozen: bool) -> Empty:
        """Pause (``frozen``) a running task or resume a paused one, and tell containerd."""
        task = self._task(task_id)
        sandbox = self._sandbox()
        if frozen:
            needed, then, change, event = (types_pb.RUNNING, types_pb.PAUSED, sandbox.pause_container,
                                           events_pb.TaskPaused)
        else:
            needed, then, change, event = (types_pb.PAUSED, types_pb.RUNNING, sandbox.resume_container,
                                           events_pb.TaskResumed)
        if task.init.status != needed:
            raise RpcError(Code.FAILED_PRECONDITION,
                           f"task {task_id!r} is not {types_pb.Status.Name(needed).lower()}")
        await change(task_id)
        task.init.status = then
        self.publisher.publish(event(container_id=task_id))
        return Empty()

    async def update(self, request: pb.UpdateTaskRequest) -> Empty:
        self._task(request.id)
        try:
            resources = json.loads(request.resources.value or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"update: resources are not JSON: {exc}") from None
        if not isinstance(resources, dict):
            raise RpcError(Code.INVALID_ARGUMENT, "update: resources must be a JSON object")
        await self._sandbox().update_container(request.id, resources)
        return Empty()

    async def checkpoint(self, request: pb.CheckpointTaskRequest) -> Empty:
        raise RpcError(Code.UNIMPLEMENTED, "checkpoint is not supported by Kabuto (the task runs in a VM)")

    # -- delete / shutdown -------------------------------------------------------------------
    async def _abandon_creates(self, task_ids: list[str]) -> None:
        creating = [self._creating[t] for t in task_ids if t in self._creating]
        self._abandoned.update(t for t in task_ids if t in self._creating)
        for task in creating:
            task.cancel()
        await asyncio.gather(*creating, return_exceptions=True)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        if not request.exec_id and request.id in self._creating:
            await self._abandon_creates([request.id])
        task = self._task(request.id)
        process = self._process(request.id, request.exec_id)
        if process.status in (types_pb.RUNNING, types_pb.PAUSED):
            raise RpcError(Code.FAILED_PRECONDITION,
                           f"cannot delete {describe(process)}: it is still running")
        pid = await self._vmm_pid()
        if not process.exited.is_set():
            self.supervisor.exited(process, KILLED_EXIT_STATUS)
        if request.exec_id:
            await release(process)
            del task.execs[request.exec_id]
        else:
            async with self._lock:
                await self._remove_task(task)
        exited_at = process.exited_at or now()
        self.publisher.publish(events_pb.TaskDelete(
            container_id=request.id, id=request.exec_id or request.id, pid=pid,
            exit_status=process.exit_status, exited_at=exited_at))
        if not request.exec_id:
            self._go_if_unneeded()
        return pb.DeleteResponse(pid=pid, exit_status=process.exit_status, exited_at=exited_at)

    async def _remove_task(self, task: Task) -> None:
        sandbox = self._sandbox()
        others = [t for t in self.tasks if t != task.id]
        if task.id == sandbox.id and others:
            raise RpcError(Code.FAILED_PRECONDITION, f"cannot delete sandbox task {task.id!r}: "
                                                     f"tasks {', '.join(others)} still belong to it")
        for process in (task.init, *task.execs.values()):
            await release(process)
        if task.id == sandbox.id:
            await sandbox.destroy()
            self.sandbox = None
        elif sandbox.vm_alive:
            await sandbox.remove_container(task.id)
        else:
            await sandbox.release_container(task.id)
        if task.mounted_rootfs is not None:
            await mounts.unmount(task.mounted_rootfs)
        del self.tasks[task.id]

    async def connect(self, request: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=await self._vmm_pid(), version="kabuto")

    async def shutdown(self, request: pb.ShutdownRequest) -> Empty:
        if not self.tasks:
            await self._abandon_creates(list(self._creating))
            self._on_idle()
        return Empty()

    def _go_if_unneeded(self) -> None:
        """A Create that made no task, or the Delete of the last task, leaves a shim holding
        nothing: it goes. containerd would send Shutdown next (it does after every Delete and
        after a failed Create), but a containerd stopped in between never does, and the one that
        restarts reloads this shim from the task's bundle, finds no task (State: NotFound, so
        `ctr task ls` hides it) and never deletes it either. A shim that exits is what containerd
        cleans up after (`shim delete`, the task's exit, its bundle)."""
        if not self.tasks and not self._creating:
            self._on_idle()

    async def close(self) -> None:
        """The shim is going: stop whatever still runs (a VM left without tasks goes too)."""
        for task in self.tasks.values():
            for process in (task.init, *task.execs.values()):
                await release(process)
        if self.sandbox is not None:
            with contextlib.suppress(KabutoError):
                await self.sandbox.destroy()
            self.sandbox = None
        for task in self.tasks.values():
            if task.mounted_rootfs is not None:
                with contextlib.suppress(KabutoError):
                    await mounts.unmount(task.mounted_rootfs)
        self.tasks.clear()


def _counter(value: int | None) -> int:
    """A guest's figure as containerd's unsigned 64-bit field: unknown or out of range reads 0."""
    return value if value is not None and 0 <= value < 2**64 else 0


def _config_path(options: AnyMessage) -> str | None:
    """CRI's runtime options name the Kabuto configuration file (``ConfigPath``)."""
    if not options.type_url.endswith(RUNTIME_OPTIONS_TYPE):
        return None
    parsed = options_pb.Options()
    try:
        parsed.ParseFromString(options.value)
    except DecodeError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"runtime options: not {RUNTIME_OPTIONS_TYPE}: {exc}") from None
    return parsed.config_path or None


def _process_spec(spec: AnyMessage) -> dict[str, Any]:
    if len(spec.value) > MAX_PROCESS_SPEC_BYTES:
        raise RpcError(Code.INVALID_ARGUMENT,
                       f"exec: process spec larger than {MAX_PROCESS_SPEC_BYTES} bytes")
    try:
        process = json.loads(spec.value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"exec: process spec is not JSON: {exc}") from None
    if not isinstance(process, dict) or not isinstance(process.get("args"), list) or not process["args"]:
        raise RpcError(Code.INVALID_ARGUMENT, "exec: process spec needs a non-empty args list")
    return process
