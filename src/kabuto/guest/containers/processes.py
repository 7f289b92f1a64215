"""Processes in the guest: forked through the launcher's monitor, set up, watched until they exit, killed.

The monitor reports the child's PID and, later, its wait status; the child reports ready,
and its report pipe's end of file after that means the exec succeeded (launcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.deadlines import caller_deadline_or
from kabuto.guest.containers.launcher import Launch, run_monitor
from kabuto.guest.containers.pipes import MessagePipe
from kabuto.guest.containers.spec import ContainerSpec, ProcessSpec
from kabuto.guest.containers.streams import InputStream, OutputStream
from kabuto.ttrpc import Code, RpcError

log = logging.getLogger(__name__)

# Fork to "ready" (mounts, lookups) when the caller set no deadline (a caller's own deadline,
# create_container_timeout for CreateContainer, bounds it otherwise, longer or shorter)
SETUP_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0
# how often a removal looks again for processes SIGKILL has not ended yet
GONE_POLL_INTERVAL = 0.01
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
NAMESPACE_FILES = (  # joined by an exec in this order: mount last, it changes the root
    (sc.CLONE_NEWIPC, "ipc"),
    (sc.CLONE_NEWUTS, "uts"),
    (sc.CLONE_NEWCGROUP, "cgroup"),
    (sc.CLONE_NEWNS, "mnt"),
    (sc.CLONE_NEWUSER, "user"),  # the launcher joins it later still (see prepare_process)
)
NAMESPACE_NAMES = {**dict(NAMESPACE_FILES), sc.CLONE_NEWPID: "pid"}


def exit_status(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


@dataclass
class Process:
    exec_id: str
    spec: ProcessSpec
    monitor_pid: int
    stdin: InputStream | None
    stdout: OutputStream
    stderr: OutputStream
    tty_fd: int | None  # the pty master (a dup) for window sizes
    exit_status: asyncio.Future[int]
    report: MessagePipe
    pid: int = 0
    waited: bool = False

    @property
    def exited(self) -> bool:
        return self.exit_status.done()

    def close(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
        self.stdout.close()
        self.stderr.close()
        self.report.close()
        if self.tty_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tty_fd)
            self.tty_fd = None

    def signal(self, number: int) -> None:
        if self.exited:
            raise RpcError(Code.FAILED_PRECONDITION, f"process {self.exec_id or 'init'} has already exited")
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, number)


async def spawn(
    exec_id: str,
    spec: ProcessSpec,
    *,
    container: ContainerSpec | None,
    start_fd: int | None,
    cgroup_dir: Path | None,
    namespace_fds: tuple[tuple[int, int], ...],
    pid_namespace_fd: int | None,
    tasks: set[asyncio.Task[None]],
) -> Process:
    """Fork the monitor and wait until the child reports ready (or fails)."""
    child_fds: list[int] = []
    agent_fds: list[int] = []
    console: socket.socket | None = None
    try:
        console_socket = None
        stdio: tuple[int, int, int] | None = None
        stdin_fd: int | None
        stdout_fd: int | None
        stderr_fd: int | None
        if spec.terminal:
            # The child makes the pty in the container and sends its master (ready comes after).
            console, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            console_socket = child_end.detach()
            child_fds.append(console_socket)
            stdin_fd = stdout_fd = stderr_fd = None
        else:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
            stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
            child_fds += [stdin_r, stdout_w, stderr_w]
            agent_fds += [stdin_w, stdout_r, stderr_r]
            stdio = (stdin_r, stdout_w, stderr_w)
            stdin_fd, stdout_fd, stderr_fd = stdin_w, stdout_r, stderr_r
            for fd in (stdout_r, stderr_r):
                # Bigger pipes: fewer wake-ups per megabyte (the kernel may refuse; then 64 KiB).
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        monitor_r, monitor_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        agent_fds += [monitor_r, report_r]
        child_fds += [monitor_w, report_w]
        launch = Launch(
            process=spec,
            stdio=stdio,
            monitor_fd=monitor_w,
            report_fd=report_w,
            start_fd=start_fd,
            container=container,
            namespace_fds=namespace_fds,
            pid_namespace_fd=pid_namespace_fd,
            cgroup_procs=None if cgroup_dir is None else str(cgroup_dir / "cgroup.procs"),
            console_socket=console_socket,
        )
        monitor_pid = os.fork()
        if monitor_pid == 0:
            run_monitor(launch)  # never returns
    except OSError as exc:
        for fd in child_fds + agent_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if console is not None:
            console.close()
        raise RpcError(Code.RESOURCE_EXHAUSTED, f"cannot start a process: {exc}") from None
    for fd in child_fds:
        os.close(fd)
    for fd in (stdin_fd, stdout_fd, stderr_fd):
        if fd is not None:
            os.set_blocking(fd, False)
    monitor = MessagePipe(monitor_r)
    process = Process(
        exec_id=exec_id,
        spec=spec,
        monitor_pid=monitor_pid,
        stdin=None if stdin_fd is None else InputStream(stdin_fd, tty=False),
        stdout=OutputStream(stdout_fd),
        stderr=OutputStream(stderr_fd),
        tty_fd=None,
        exit_status=asyncio.get_running_loop().create_future(),
        report=MessagePipe(report_r),
    )
    try:
        async with asyncio.timeout_at(caller_deadline_or(SETUP_TIMEOUT)):
            first = await monitor.next()
            if first is None or "pid" not in first:
                reason = (first or {}).get("error", "the launcher died")
                raise RpcError(Code.INTERNAL, f"cannot start the process: {reason}")
            process.pid = int(first["pid"])
            watch(monitor, process, tasks)
            report = await process.report.next()
        if report is not None and "ready" in report and console is not None:
            attach_terminal(process, console)
    except TimeoutError:
        await fail_spawn(process, monitor)
        raise RpcError(Code.DEADLINE_EXCEEDED, "the process was not set up in time") from None
    except BaseException:
        await fail_spawn(process, monitor)
        raise
    finally:
        if console is not None:
            console.close()  # a master still in flight is closed with it
    if report is None or "ready" not in report:
        reason = (report or {}).get("error") or "the process died while being set up"
        await fail_spawn(process, monitor)
        raise RpcError(Code.FAILED_PRECONDITION, f"unable to start container process: {reason}")
    return process


async def spawn_exec(
    exec_id: str,
    spec: ProcessSpec,
    *,
    container_id: str,
    init_pid: int,
    namespaces: int,
    cgroup_dir: Path | None,
    tasks: set[asyncio.Task[None]],
) -> Process:
    """Spawn a process in a running container: it joins the namespaces (CLONE_NEW* flags) of its init."""
    opened: list[int] = []
    try:
        namespace_fds = []
        for ns_type, name in NAMESPACE_FILES:
            if namespaces & ns_type:
                opened.append(os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC))
                namespace_fds.append((ns_type, opened[-1]))
        pid_namespace_fd = None
        if namespaces & sc.CLONE_NEWPID:
            pid_namespace_fd = os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            opened.append(pid_namespace_fd)
    except OSError:
        for fd in opened:
            os.close(fd)
        raise RpcError(Code.FAILED_PRECONDITION, f"container {container_id!r} is not running") from None
    try:
        return await spawn(
            exec_id,
            spec,
            container=None,
            start_fd=None,
            cgroup_dir=cgroup_dir,
            namespace_fds=tuple(namespace_fds),
            pid_namespace_fd=pid_namespace_fd,
            tasks=tasks,
        )
    finally:
        for fd in opened:
            os.close(fd)


async def fail_spawn(process: Process, monitor: MessagePipe) -> None:
    if process.pid:
        await kill_and_reap([process])
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.monitor_pid, signal.SIGKILL)
        monitor.close()
    process.close()


def watch(monitor: MessagePipe, process: Process, tasks: set[asyncio.Task[None]]) -> None:
    """Report the process's exit from its monitor; ``tasks`` holds the watching task until then."""

    async def report_exit() -> None:
        try:
            message = await monitor.next()
        finally:
            monitor.close()
        status = (message or {}).get("status")
        # A monitor that vanished without a report: the process is lost, report it as killed.
        code = exit_status(int(status)) if isinstance(status, int) else 128 + signal.SIGKILL
        if not process.exit_status.done():
            process.exit_status.set_result(code)
        if process.stdin is not None and not process.spec.terminal:
            process.stdin.close()

    task = asyncio.create_task(report_exit(), name=f"exit of pid {process.pid}")
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def await_exec(process: Process, processes: dict[str, Process] | None = None) -> None:
    """After ready: end of file on the report pipe means the exec succeeded (else the process is
    killed, and dropped from ``processes``, its container's execs)."""
    try:
        async with asyncio.timeout_at(caller_deadline_or(SETUP_TIMEOUT)):
            report = await process.report.next()
    except TimeoutError:
        report = {"error": "the process did not exec in time"}
    process.report.close()
    if report is not None:
        await kill_and_reap([process])
        if processes is not None:
            processes.pop(process.exec_id, None)
            process.close()
        reason = report.get("error", "unexpected report")
        raise RpcError(Code.FAILED_PRECONDITION, f"unable to start container process: {reason}")


async def kill_and_reap(processes: list[Process]) -> None:
    for process in processes:
        if not process.exited and process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
    pending = [asyncio.shield(p.exit_status) for p in processes if not p.exited]
    if pending:
        _, still = await asyncio.wait(pending, timeout=KILL_TIMEOUT)
        if still:
            log.warning("%d processes did not report their exit within %gs", len(still), KILL_TIMEOUT)


async def wait_until_gone(container_id: str, mnt_namespace: str, killed: list[int]) -> None:
    """Until no process is left in the mount namespace, or KILL_TIMEOUT passed (then a warning).

    A dying process drops its namespaces before it becomes a zombie: the ``killed`` ones, and
    any seen later, are watched by pid until each is a zombie or gone, not only while its
    namespace shows."""
    deadline = time.monotonic() + KILL_TIMEOUT
    watched = set(killed)
    while left := {pid for pid in watched | set(pids_in(mnt_namespace)) if not _exited(pid)}:
        watched = left
        if time.monotonic() > deadline:
            log.warning("container %s: %d processes outlived SIGKILL for %gs", container_id, len(left),
                        KILL_TIMEOUT)
            return
        await asyncio.sleep(GONE_POLL_INTERVAL)


def _exited(pid: int) -> bool:
    """Gone, or a zombie (or dead) waiting for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


def pids_in(mnt_namespace: str) -> list[int]:
    """Processes in the container's mount namespace (seen from the agent's PID namespace)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry.name}/ns/mnt") == mnt_namespace:
                pids.append(int(entry.name))
    return sorted(pids)


def attach_terminal(process: Process, console: socket.socket) -> None:
    """Take the pty master the child sent before reporting ready (so it is already
    queued: no wait) as the process's stdin, output and window-size fd."""
    try:
        _, fds, flags, _ = socket.recv_fds(console, 16, 1, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        fds, flags = [], 0
    master = fds[0] if len(fds) == 1 and not flags & socket.MSG_CTRUNC else None
    if master is None or not os.isatty(master):
        for fd in fds:
            os.close(fd)
        raise RpcError(Code.INTERNAL, "unable to start container process: the launcher sent no terminal")
    try:
        stdin_fd = os.dup(master)
        try:
            tty_fd = os.dup(master)
        except OSError:
            os.close(stdin_fd)
            raise
    except OSError as exc:
        os.close(master)
        raise RpcError(Code.RESOURCE_EXHAUSTED, f"cannot start a process: {exc}") from None
    os.set_blocking(master, False)  # shared by the dups: one open file
    process.stdin = InputStream(stdin_fd, tty=True)
    process.stdout = OutputStream(master)
    process.tty_fd = tty_fd


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
