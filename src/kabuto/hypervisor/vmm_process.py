"""The VMM-process toolkit every backend that runs a process uses (QEMU, Cloud Hypervisor,
Firecracker; virtiofsd beside them): spawn in a network namespace, a capped log, bounded waits,
one liveness rule, adoption by another kabuto process, SIGTERM then SIGKILL, sun_path and
netns path rules, and vCPU threads by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

import psutil

from kabuto.errors import HypervisorError, HypervisorUnavailable, VmTimeout
from kabuto.processes import live_process, process_record, still_running

#: sun_path is 108 bytes including the terminating NUL
MAX_UNIX_PATH = 107
#: where ``ip netns add NAME`` puts a named network namespace
NETNS_RUN_DIR = Path("/run/netns")
#: how much of a VMM's log an error message quotes
LOG_TAIL_BYTES = 2048
#: a VMM's output includes the guest's serial console, which the guest controls: cap the log
LOG_CAP_BYTES = 4 << 20
#: after SIGTERM, how long a process gets before SIGKILL; after SIGKILL, how long it gets to go
TERM_GRACE = 3.0
_POLL = 0.02
#: after an exit, how long the output copier gets to read what is left in the pipe
OUTPUT_DRAIN_TIMEOUT = 1.0


def check_socket_path(backend: str, *paths: Path) -> None:
    """Refuse a Unix socket path that does not fit sun_path, naming the longest."""
    longest = max(paths, key=lambda p: len(os.fsencode(p)))
    if len(os.fsencode(longest)) > MAX_UNIX_PATH:
        raise HypervisorError(
            f"{backend}: socket path {longest} is longer than {MAX_UNIX_PATH} bytes; "
            "use a shorter jailer root or VM id"
        )


def netns_path(netns: str) -> str:
    """A network namespace given as a path, or as a name ``ip netns`` made."""
    return netns if netns.startswith("/") else str(NETNS_RUN_DIR / netns)


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a command inside ``netns`` (nothing without one)."""
    return ["nsenter", f"--net={netns_path(netns)}", "--"] if netns else []


class VmmProcess:
    """A helper process (VMM, virtiofsd) we spawned or adopted from saved state.

    Every wait is bounded; ``stop`` escalates SIGTERM to SIGKILL and never raises.
    """

    def __init__(self, backend: str, what: str, log_path: Path | None = None) -> None:
        self.backend = backend
        self.what = what
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._adopted: psutil.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        # the end of the output, for error messages
        self._tail = b""

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        if self._adopted is not None:
            return self._adopted.pid
        return None

    @property
    def returncode(self) -> int | None:
        """The exit status of a child that exited (negative: the signal); None otherwise."""
        return self._proc.returncode if self._proc is not None else None

    def record(self) -> dict[str, Any] | None:
        """What ``adopt`` needs in another kabuto process, or None if nothing runs."""
        pid = self.pid
        if pid is None:
            return None
        try:
            return process_record(pid)
        except psutil.Error:
            return None

    async def spawn(self, argv: list[str], cwd: Path | None = None, netns: str | None = None) -> None:
        """Start ``argv`` (inside ``netns`` when given); its output goes to the capped log."""
        argv = [*netns_prefix(netns), *argv]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=cwd,
                # a Ctrl-C aimed at kabuto must not kill the VM, and the VM outlives this process
                # when its state is saved for a later one
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise HypervisorUnavailable(f"{self.backend}: {self.what} binary {argv[0]} not found") from exc
        except PermissionError as exc:
            raise HypervisorUnavailable(
                f"{self.backend}: {self.what} binary {argv[0]} is not executable"
            ) from exc
        except OSError as exc:
            raise HypervisorError(f"{self.backend}: cannot run {self.what} {argv[0]}: {exc}") from exc
        assert self._proc.stdout is not None
        self._pump = asyncio.create_task(self._copy_output(self._proc.stdout))

    async def _copy_output(self, output: asyncio.StreamReader) -> None:
        """Copy the process's output into the capped log; keep draining past the cap so the
        VMM never blocks on a full pipe."""
        log = CappedLog(self.log_path) if self.log_path else None
        try:
            while chunk := await output.read(65536):
                self._tail = (self._tail + chunk)[-LOG_TAIL_BYTES:]
                if log is not None:
                    log.write(chunk)
        finally:
            if log is not None:
                log.close()

    async def output_done(self) -> None:
        """Give the output copier a moment to reach EOF after an exit (so that ``log_tail`` has the
        last words), then stop it."""
        if self._pump is None:
            return
        # asyncio.wait and gather(return_exceptions) take the pump's own end, whatever it is, and
        # still raise a cancellation of the caller (a suppressed CancelledError would swallow a
        # Ctrl-C that arrived here)
        await asyncio.wait({self._pump}, timeout=OUTPUT_DRAIN_TIMEOUT)
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    def adopt(self, record: dict[str, Any]) -> None:
        """Take over the process another kabuto process spawned (``record()``); refuse a
        recycled pid."""
        pid = int(record["pid"])
        try:
            psutil.Process(pid)
        except psutil.NoSuchProcess as exc:
            raise HypervisorError(f"{self.backend}: {self.what} (pid {pid}) is gone") from exc
        process = live_process(record)
        if process is None:
            raise HypervisorError(f"{self.backend}: pid {pid} now belongs to another process "
                                  f"(or {self.what} has exited)")
        self._adopted = process

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return self._adopted is not None and still_running(self._adopted)

    def exit_description(self) -> str:
        code = self.returncode
        if code is None:
            status = "exited"
        elif code < 0:
            status = f"was killed by signal {-code}"
        else:
            status = f"exited with status {code}"
        tail = self.log_tail()
        return f"{self.what} {status}" + (f"; its output ends with: {tail}" if tail else "")

    def log_tail(self) -> str:
        return self._tail.decode(errors="replace").strip()

    async def wait_for_socket(self, path: Path, timeout: float, probe: bool = True) -> None:
        """Wait until ``path`` accepts connections; fail early if the process dies.

        ``probe=False`` only waits for the socket file: a vhost-user daemon such as virtiofsd
        serves exactly one connection, so a probing connect would use it up.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            if self._proc is not None:
                await asyncio.sleep(0)  # let the child watcher record an exit
            if not self.alive():
                await self.output_done()
                raise HypervisorError(f"{self.backend}: {self.exit_description()} before opening {path}")
            if (await _connectable(path)) if probe else _is_socket(path):
                return
            if time.monotonic() >= deadline:
                raise VmTimeout(f"{self.backend}: {self.what} did not open {path} within {timeout:g}s")
            await asyncio.sleep(_POLL)

    async def wait_exit(self, timeout: float | None) -> bool:
        """Whether the process is gone within ``timeout`` seconds (None: the caller bounds it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout=remaining)
            else:
                await asyncio.sleep(_POLL)
        return True

    async def kill(self, timeout: float = TERM_GRACE) -> bool:
        """SIGKILL and wait (bounded) until it is gone; reaps our own child."""
        return await self._signal_and_wait(signal.SIGKILL, timeout)

    async def stop(self, grace: float = TERM_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace``; reaps our own child."""
        if self.pid is not None and not await self._signal_and_wait(signal.SIGTERM, grace):
            await self.kill(grace)
        await self.output_done()
        self._adopted = None

    async def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> bool:
        pid = self.pid
        if pid is None:
            return True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return await self.wait_exit(timeout)


class CappedLog:
    """A log file that stops growing at LOG_CAP_BYTES and says so."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "ab")
        self._room = LOG_CAP_BYTES

    def write(self, chunk: bytes) -> None:
        if self._room <= 0:
            return
        kept = chunk[: self._room]
        self._room -= len(kept)
        self._file.write(kept)
        if self._room <= 0:
            self._file.write(f"\n[kabuto: log capped at {LOG_CAP_BYTES} bytes]\n".encode())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


async def _connectable(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout=1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def kill_processes_naming(directory: Path, timeout: float = TERM_GRACE) -> list[int]:
    """SIGKILL every process whose command line names a path in ``directory`` and wait (bounded)
    until they are gone; the pids. For a VM whose creator died before it recorded its processes:
    every process kabuto spawns for a VM names its VM directory (QEMU's QMP socket, virtiofsd's
    socket, the REST VMMs' API socket)."""
    prefix = f"{directory}/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(prefix in arg for arg in process.info.get("cmdline") or []):
                process.kill()
                found.append(process)
    await asyncio.to_thread(psutil.wait_procs, found, timeout)
    return [process.pid for process in found]


def vcpu_thread_ids(pid: int, name_pattern: re.Pattern[str]) -> dict[int, int]:
    """vCPU index -> tid, from the thread names under /proc/<pid>/task (the API does not say)."""
    result: dict[int, int] = {}
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return result
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended while we looked
        match = name_pattern.fullmatch(comm)
        if match:
            result[int(match.group(1))] = int(task.name)
    return result


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
