"""Per-process supervision in the shim: every process (a task's init or an exec) gets its stdio
pumped between containerd's FIFOs and the agent, and a waiter that records its exit (bounded to
containerd's fields) and tells containerd (TaskExit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from kabuto.errors import KabutoError
from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_task_types_pb2 as types_pb
from kabuto.runtime.sandbox import VirtSandbox
from kabuto.runtime.streaming import OUTPUT_DRAIN_TIMEOUT
from kabuto.shim.events import Publisher
from kabuto.shim.stdio import ProcessStdio, write_all

log = logging.getLogger(__name__)

# a process whose VM or agent channel died is reported with this status (as Kata does)
LOST_EXIT_STATUS = 255
MAX_EXIT_STATUS = 255
# after a task's init exits: how long the guest gets to say whether its OOM killer struck
OOM_CHECK_TIMEOUT = 5.0


def now() -> Timestamp:
    timestamp = Timestamp()
    timestamp.GetCurrentTime()
    return timestamp


@dataclass
class Process:
    """A task's init process (exec_id "") or an exec'd one."""

    container_id: str
    exec_id: str
    stdio: ProcessStdio
    spec: dict[str, Any] | None = None  # an exec's OCI process, until it starts
    status: int = types_pb.CREATED
    exit_status: int = 0
    exited_at: Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stdin_pump: asyncio.Task[None] | None = None
    stdin_closing: asyncio.Event = field(default_factory=asyncio.Event)  # containerd's CloseIO
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


async def cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel and wait: a pump still registered on a FIFO must let go before the FIFO closes."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def release(process: Process) -> None:
    await cancel([t for t in process.tasks if t is not asyncio.current_task()])
    process.stdio.close()


def describe(process: Process) -> str:
    if process.exec_id:
        return f"exec {process.exec_id!r} of task {process.container_id!r}"
    return f"task {process.container_id!r}"


class Supervisor:
    """Starts and ends the pumps and the exit waiter of the shim's processes."""

    def __init__(self, sandbox: Callable[[], VirtSandbox], publisher: Publisher,
                 vmm_pid: Callable[[], Awaitable[int]]) -> None:
        self._sandbox = sandbox
        self.publisher = publisher
        self._vmm_pid = vmm_pid

    def supervise(self, process: Process) -> None:
        pumps = [asyncio.create_task(self._pump_output(process, stream)) for stream in ("stdout", "stderr")
                 if not (stream == "stderr" and process.stdio.terminal)]
        process.tasks += pumps
        if process.stdio.stdin_fd is not None:
            process.stdin_pump = asyncio.create_task(self._pump_stdin(process))
            process.tasks.append(process.stdin_pump)
        self.watch_exit(process, pumps)

    def watch_exit(self, process: Process, pumps: list[asyncio.Task[None]]) -> None:
        process.tasks.append(asyncio.create_task(self._wait_exit(process, pumps)))

    async def _pump_output(self, process: Process, stream: str) -> None:
        sandbox = self._sandbox()
        while chunk := await sandbox.read_output(process.container_id, process.exec_id, stream):
            fd = process.stdio.output_fd(stream)
            if fd is not None:
                await write_all(fd, chunk)

    async def _pump_stdin(self, process: Process) -> None:
        sandbox = self._sandbox()
        try:
            while (data := process.stdio.read_stdin()) != b"":
                if data is None:
                    if process.stdin_closing.is_set():  # CloseIO, and everything before it is sent
                        break
                    await process.stdio.wait_stdin(process.stdin_closing)
                else:
                    await sandbox.write_stdin(process.container_id, process.exec_id, data)
            await self._end_stdin(process)
        except KabutoError as exc:  # the process exited, or its VM: its stdin goes nowhere
            log.debug("%s: stdin ends: %s", describe(process), exc)

    async def _end_stdin(self, process: Process) -> None:
        if process.stdio.stdin_fd is None:
            return
        process.stdio.close_stdin()
        if process.status in (types_pb.RUNNING, types_pb.PAUSED):
            await self._sandbox().close_stdin(process.container_id, process.exec_id)

    async def _wait_exit(self, process: Process, pumps: list[asyncio.Task[None]]) -> None:
        sandbox = self._sandbox()
        try:
            status = await sandbox.wait_process(process.container_id, process.exec_id)
            assert status is not None
            if not 0 <= status <= MAX_EXIT_STATUS:  # the guest's word: bounded before containerd sees it
                log.warning("%s: the guest reported exit status %d", describe(process), status)
                status = LOST_EXIT_STATUS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTPUT_DRAIN_TIMEOUT):
                    await asyncio.gather(*pumps, return_exceptions=True)
        except KabutoError as exc:
            log.warning("%s: lost (%s)", describe(process), exc)
            status = LOST_EXIT_STATUS
        await cancel([*pumps, *([process.stdin_pump] if process.stdin_pump else [])])
        if not process.exec_id and status != LOST_EXIT_STATUS:
            await self._report_oom(process)
        self.exited(process, status)
        self.publisher.publish(events_pb.TaskExit(
            container_id=process.container_id, id=process.exec_id or process.container_id,
            pid=await self._vmm_pid(), exit_status=status, exited_at=process.exited_at))

    async def _report_oom(self, process: Process) -> None:
        """TaskOOM (before TaskExit, as runc's shim sends it) when the guest's OOM killer took a
        process of the task's container: CRI then reports the container as OOMKilled."""
        try:
            async with asyncio.timeout(OOM_CHECK_TIMEOUT):
                stats = await self._sandbox().containers.stats_container(process.container_id)
        except (KabutoError, TimeoutError) as exc:
            log.debug("%s: no OOM figure from the guest: %s", describe(process), exc)
            return
        if stats.memory_oom_kills:
            log.info("%s: the guest's OOM killer took %d of its processes", describe(process),
                     stats.memory_oom_kills)
            self.publisher.publish(events_pb.TaskOOM(container_id=process.container_id))

    @staticmethod
    def exited(process: Process, status: int) -> None:
        process.stdio.close()
        process.status, process.exit_status, process.exited_at = types_pb.STOPPED, status, now()
        process.exited.set()
