"""Plumbing shared by backends that spawn a VMM and drive it over a REST API on a Unix socket.

Not a backend: Cloud Hypervisor and Firecracker both use it, neither imports the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import psutil

from kabuto.errors import HypervisorError, HypervisorUnavailable, VmTimeout
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    VfioDevice,
)

#: sun_path is 108 bytes including the terminating NUL
MAX_UNIX_PATH = 107
#: how much of a VMM's log an error message quotes
LOG_TAIL_BYTES = 2048
#: a VMM's output includes the guest's serial console, which the guest controls: cap the log
LOG_CAP_BYTES = 4 << 20
#: bound on every API call; a VMM that does not answer in this time is treated as hung
API_TIMEOUT = 10.0
#: bound on an API answer's body (vm.info is a few KiB)
MAX_API_ANSWER_BYTES = 1 << 20
#: after SIGTERM, how long a process gets before SIGKILL
TERM_GRACE = 3.0
_POLL = 0.02
#: after an API connection failure, how long to wait for the VMM's exit to show
EXIT_NOTICE = 0.5
#: after an exit, how long the output copier gets to read what is left in the pipe
OUTPUT_DRAIN_TIMEOUT = 1.0


def check_socket_path(backend: str, path: Path) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise HypervisorError(
            f"{backend}: socket path {path} is longer than {MAX_UNIX_PATH} bytes; "
            "use a shorter jailer root or VM id"
        )


def netns_prefix(netns: str | None) -> list[str]:
    """Run a command inside a network namespace (a path, or a name under /run/netns)."""
    if not netns:
        return []
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--"]


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

    def start_time(self) -> float:
        pid = self.pid
        if pid is None:
            return 0.0
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return 0.0

    async def spawn(self, argv: list[str], cwd: Path | None = None) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C aimed at kabuto must not kill the VM
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

    async def _output_done(self) -> None:
        """Give the output copier a moment to reach EOF after an exit, then stop it."""
        if self._pump is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._pump), OUTPUT_DRAIN_TIMEOUT)
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump

    def adopt(self, pid: int, start_time: float) -> None:
        """Take over a process another kabuto process spawned; refuse a recycled pid."""
        try:
            proc = psutil.Process(pid)
            if start_time and abs(proc.create_time() - start_time) > 1.0:
                raise HypervisorError(f"{self.backend}: pid {pid} now belongs to another process")
        except psutil.NoSuchProcess as exc:
            raise HypervisorError(f"{self.backend}: {self.what} (pid {pid}) is gone") from exc
        self._adopted = proc

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        if self._adopted is not None:
            try:
                return self._adopted.is_running() and self._adopted.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        return False

    def exit_description(self) -> str:
        code = self._proc.returncode if self._proc is not None else None
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
                await self._output_done()
                raise HypervisorError(f"{self.backend}: {self.exit_description()} before opening {path}")
            if (await _connectable(path)) if probe else _is_socket(path):
                return
            if time.monotonic() >= deadline:
                raise VmTimeout(f"{self.backend}: {self.what} did not open {path} within {timeout:g}s")
            await asyncio.sleep(_POLL)

    async def died(self, error: HypervisorError) -> bool:
        """Whether the process is gone; after a failed connection, give its exit a moment to show."""
        if isinstance(error, ApiTransportError):
            return await self.wait_exit(EXIT_NOTICE)
        return not self.alive()

    async def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            if self._proc is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout=max(deadline - time.monotonic(), 0.0))
            else:
                await asyncio.sleep(_POLL)
        return True

    async def stop(self, grace: float = TERM_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace``; reaps our own child."""
        pid = self.pid
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if await self.wait_exit(wait):
                break
        await self._output_done()
        self._adopted = None


def process_state(proc: VmmProcess | None) -> dict[str, Any] | None:
    """What ``VmmProcess.adopt`` needs in another kabuto process, or None if nothing runs."""
    if proc is None or proc.pid is None:
        return None
    return {"pid": proc.pid, "start_time": proc.start_time()}


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


class ApiTransportError(HypervisorError):
    """The API socket failed (refused, reset): the VMM may have just died."""


class ApiClient:
    """HTTP/1.1 over a Unix socket; every non-2xx answer becomes a HypervisorError with the body."""

    def __init__(
        self,
        backend: str,
        socket_path: Path,
        describe_error: Callable[[httpx.Response], str],
        timeout: float = API_TIMEOUT,
    ) -> None:
        self.backend = backend
        self.socket_path = socket_path
        self._describe_error = describe_error
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://localhost",
            timeout=timeout,
        )

    async def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            async with self._client.stream(method, path, json=body) as streamed:
                content = bytearray()
                async for chunk in streamed.aiter_bytes():
                    content += chunk
                    if len(content) > MAX_API_ANSWER_BYTES:
                        raise HypervisorError(
                            f"{self.backend}: {method} {path}: answer exceeds {MAX_API_ANSWER_BYTES} bytes"
                        )
            response = httpx.Response(
                streamed.status_code,
                headers=streamed.headers,
                content=bytes(content),
                request=streamed.request,
            )
        except httpx.TimeoutException as exc:
            raise VmTimeout(f"{self.backend}: {method} {path} got no answer within the API timeout") from exc
        except httpx.TransportError as exc:
            raise ApiTransportError(
                f"{self.backend}: {method} {path} failed: {exc or type(exc).__name__}"
            ) from exc
        except httpx.HTTPError as exc:
            raise HypervisorError(
                f"{self.backend}: {method} {path} failed: {exc or type(exc).__name__}"
            ) from exc
        if not response.is_success:
            detail = self._describe_error(response)
            raise HypervisorError(f"{self.backend}: {method} {path} -> {response.status_code}: {detail}")
        return response

    async def aclose(self) -> None:
        await self._client.aclose()


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


def hybrid_vsock_url(uds: Path, port: int) -> str:
    return f"hvsock://{uds}:{port}"


#: the port the guest agent listens on, reached with ``CONNECT <port>`` on the hybrid vsock socket
HYBRID_VSOCK_AGENT_PORT = 1024
HYBRID_VSOCK_GUEST_CID = 3


def hybrid_vsock_agent_channel(socket_path: Path) -> AgentChannel:
    """The agent channel of a VMM whose vsock the host reaches through a Unix socket."""
    return AgentChannel(id="agent", channel=ChannelKind.HYBRID_VSOCK, socket_path=socket_path,
                        guest_cid=HYBRID_VSOCK_GUEST_CID, port=HYBRID_VSOCK_AGENT_PORT)


# -- devices in saved state ---------------------------------------------------------------
_DEVICE_TYPES: dict[DeviceKind, type] = {
    DeviceKind.BLOCK: BlockDevice,
    DeviceKind.NETWORK: NetworkDevice,
    DeviceKind.AGENT_CHANNEL: AgentChannel,
    DeviceKind.SHARED_FS: SharedFsDevice,
    DeviceKind.VFIO: VfioDevice,
}
_PATH_FIELDS = {"path", "socket_path", "host_path", "daemon_socket"}


def device_to_dict(device: AnyDevice) -> dict[str, Any]:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(device).items()}
    data["kind"] = device.kind.value
    return data


def device_from_dict(data: dict[str, Any]) -> AnyDevice:
    cls = _DEVICE_TYPES[DeviceKind(data["kind"])]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        if f.name in _PATH_FIELDS and value is not None:
            value = Path(value)
        elif f.name == "channel":
            value = ChannelKind(value)
        elif f.name == "fs":
            value = SharedFsKind(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
