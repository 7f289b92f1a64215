"""Where the agent listens: the virtio-serial port, AF_VSOCK, or (on a host) a Unix socket.

A virtio-serial port is a single byte stream that stays open in the guest while host
clients come and go: when the host side disconnects, reads return EOF (and poll reports
POLLHUP) until a host connects again. The port's fd is therefore kept open for the
agent's whole life and each host connection is served as a fresh ttrpc session on it.
Closing and reopening the port instead would let the kernel discard bytes a new host
client had already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT_NAME = "agent.channel.0"
# A virtio-serial port takes one host connection at a time: the host gets several ports named
# agent.channel.N so that several host processes can talk to the agent at once.
PORT_NAME_PREFIX = "agent.channel."
PORT_POLL_INTERVAL = 0.02
# SIGIO announces a host (dis)connection; this poll only backs it up, rarely where SIGIO works:
# every idle port woke 10 times a second, which kept an idle TCG guest's vCPU half busy
# (docs/benchmarks.md, cold start); without SIGIO the poll is all there is, and it is kept short.
HOST_POLL_INTERVAL = 0.1
HOST_POLL_BACKSTOP = 2.0
READ_CHUNK = 256 * 1024
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 * 1024
# Kata's agent vsock port (the host side's kabuto.hypervisor.devices.AGENT_VSOCK_PORT, which the
# guest does not import); the host may pass another as agent_vsock_port= on the kernel command line.
DEFAULT_VSOCK_PORT = 1024
# The guest driver of a virtio vsock device, whether the host end is vhost-vsock (QEMU) or the
# VMM's own hybrid vsock (Firecracker, Cloud Hypervisor, Dragonball): its module's name, which
# Linux uses as the driver's name under /sys/bus/virtio/drivers/ when built in too.
VSOCK_DRIVER = "vmw_vsock_virtio_transport"
# --vsock: serve it when the VM has a vsock device, always (any transport, such as the loopback
# one at CID 1), or never
VSOCK_MODES = ("auto", "on", "off")

Serve = Callable[..., Awaitable[None]]  # (reader, writer, **options), as ttrpc.Server.serve


class ChannelError(Exception):
    """The agent channel cannot be found or opened."""


def find_port(name: str, dev: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> Path | None:
    """The device node of the virtio-serial port called ``name``, created if devtmpfs lacks it."""
    link = dev / "virtio-ports" / name
    if link.exists():
        return link
    ports = sys_root / "class" / "virtio-ports"
    with contextlib.suppress(OSError):
        for port in sorted(ports.iterdir()):
            try:
                if (port / "name").read_text().strip() != name:
                    continue
                node = dev / port.name
                if not node.exists():
                    major, minor = (int(n) for n in (port / "dev").read_text().split(":"))
                    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
                return node
            except (OSError, ValueError):
                continue
    return None


def find_ports(prefix: str, dev: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> dict[str, Path]:
    """Every virtio-serial port whose name starts with ``prefix``: name -> device node."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        names.update(link.name for link in (dev / "virtio-ports").iterdir())
    with contextlib.suppress(OSError):
        for port in (sys_root / "class" / "virtio-ports").iterdir():
            with contextlib.suppress(OSError):
                names.add((port / "name").read_text().strip())
    found = {name: find_port(name, dev, sys_root) for name in sorted(names) if name.startswith(prefix)}
    return {name: path for name, path in found.items() if path is not None}


def vsock_devices(sys_root: Path = Path("/sys")) -> list[str] | None:
    """The virtio devices bound to the vsock transport (``virtioN``), or None if the kernel
    lacks that driver (the module was not loaded, or the kernel has no virtio vsock)."""
    try:
        entries = list((sys_root / "bus" / "virtio" / "drivers" / VSOCK_DRIVER).iterdir())
    except OSError:
        return None
    return sorted(entry.name for entry in entries if entry.name.startswith("virtio"))


def serves_vsock(mode: str, sys_root: Path = Path("/sys")) -> bool:
    return mode == "on" or (mode == "auto" and bool(vsock_devices(sys_root)))


@dataclass(frozen=True)
class Channels:
    """What the agent serves: virtio-serial ports (name -> device node) and/or AF_VSOCK."""

    ports: dict[str, Path]
    vsock: bool


def find_channels(port_name: str, vsock: str, dev: Path = Path("/dev"),
                  sys_root: Path = Path("/sys")) -> Channels:
    port = find_port(port_name, dev, sys_root)
    return Channels({port_name: port} if port else {}, serves_vsock(vsock, sys_root))


def why_no_vsock(mode: str, sys_root: Path = Path("/sys")) -> str:
    if mode == "off":
        return "vsock is off"
    if vsock_devices(sys_root) is None:
        return f"no vsock transport (no {VSOCK_DRIVER} driver in this kernel)"
    return f"no vsock device (none bound to {VSOCK_DRIVER})"


async def wait_for_channels(port_name: str, vsock: str, timeout: float, dev: Path = Path("/dev"),
                            sys_root: Path = Path("/sys")) -> Channels:
    """The channels present once one is: drivers may still be probing, so wait, but not forever.

    A VM may have a virtio-serial port, a vsock device or both; with neither it has no agent.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := find_channels(port_name, vsock, dev, sys_root)).ports and not found.vsock:
        if loop.time() >= deadline:
            raise ChannelError(f"no agent channel within {timeout:g}s: no virtio-serial port named "
                               f"{port_name!r} appeared and {why_no_vsock(vsock, sys_root)}")
        await asyncio.sleep(PORT_POLL_INTERVAL)
    return found


class _PortTransport(asyncio.Transport):
    """One host session on the port fd. Closing it ends the session, never the fd."""

    def __init__(self, fd: int, protocol: asyncio.StreamReaderProtocol) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False
        self._reading = False
        self._writing_paused = False
        self.eof = self._loop.create_future()  # set when the host side disconnects
        protocol.connection_made(self)
        self.resume_reading()

    # Reading.
    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def is_reading(self) -> bool:
        return self._reading

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                self._lose(exc)
                return
            data = b""  # a pty master reports its peer's close as EIO: the same as EOF here
        if data:
            self._protocol.data_received(data)
            return
        self.pause_reading()
        if not self.eof.done():
            self.eof.set_result(None)
        self._protocol.eof_received()

    # Writing.
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        if not self._out:
            try:
                written = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                written = 0
            except OSError as exc:
                self._lose(exc)
                return
            data = memoryview(data)[written:]
            if not data:
                return
            self._loop.add_writer(self._fd, self._on_writable)
        self._out += data
        if len(self._out) > WRITE_HIGH_WATER and not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lose(exc)
            return
        del self._out[:written]
        if not self._out:
            self._loop.remove_writer(self._fd)
        if self._writing_paused and len(self._out) <= WRITE_LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if self._out:
            self._loop.remove_writer(self._fd)
            self._out.clear()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def _lose(self, exc: OSError) -> None:
        log.warning("agent port I/O failed: %s", exc)
        if not self.eof.done():
            self.eof.set_exception(exc)
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


# Every open port asks for SIGIO, but a signal has one handler: it wakes all the ports' waiters.
_sigio_listeners: set[asyncio.Event] = set()


def _on_sigio() -> None:
    for event in _sigio_listeners:
        event.set()


class VirtioSerialChannel:
    """Serves one ttrpc session per host connection on a virtio-serial port."""

    def __init__(self, fd: int, name: str) -> None:
        """``fd``: the open, non-blocking port (any character device with the same
        hang-up semantics, such as a pty master); it now belongs to this object."""
        self.fd = fd
        self.path = name
        self._host_event = asyncio.Event()
        self._sigio = self._enable_sigio()

    @classmethod
    def open(cls, path: Path) -> VirtioSerialChannel:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ChannelError(f"cannot open agent port {path}: {exc}") from exc
        return cls(fd, str(path))

    def _enable_sigio(self) -> bool:
        """Ask the kernel for SIGIO on host (dis)connection; polling stays as the fallback."""
        loop = asyncio.get_running_loop()
        try:
            # The handler comes before O_ASYNC: SIGIO's default action kills.
            if not _sigio_listeners:
                loop.add_signal_handler(signal.SIGIO, _on_sigio)
            _sigio_listeners.add(self._host_event)
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_ASYNC)
        except (OSError, RuntimeError, ValueError) as exc:
            _sigio_listeners.discard(self._host_event)
            log.info("no SIGIO on %s (%s); polling for the host", self.path, exc)
            return False
        return True

    def host_connected(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        events = poller.poll(0)
        return not any(mask & select.POLLHUP for _, mask in events)

    async def wait_for_host(self) -> None:
        while True:
            self._host_event.clear()
            if self.host_connected():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOST_POLL_BACKSTOP if self._sigio else HOST_POLL_INTERVAL):
                    await self._host_event.wait()

    async def serve_forever(self, serve: Serve) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wait_for_host()
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport = _PortTransport(self.fd, protocol)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            log.info("host connected on %s", self.path)
            await serve(reader, writer, peer_may_restart=True)
            # The session may have ended on a protocol error with the host still there:
            # discard its bytes until it disconnects, so the next host starts clean.
            await self._drain_until_eof(transport)
            log.info("host disconnected from %s", self.path)

    async def _drain_until_eof(self, transport: _PortTransport) -> None:
        if transport.eof.done():
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def discard() -> None:
            try:
                if os.read(self.fd, READ_CHUNK):
                    return
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass  # an error ends the session as surely as EOF
            if not done.done():
                done.set_result(None)

        loop.add_reader(self.fd, discard)
        try:
            await done
        finally:
            loop.remove_reader(self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._sigio:
            _sigio_listeners.discard(self._host_event)
            if not _sigio_listeners:
                # Only after every port's fd is gone: with SIGIO back at its default, one more would kill us.
                asyncio.get_running_loop().remove_signal_handler(signal.SIGIO)


def remove_stale_socket(path: Path) -> None:
    """A socket left by an earlier run would make bind() fail; anything else is kept."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


async def listen_unix(path: Path, serve: Serve) -> asyncio.Server:
    remove_stale_socket(path)
    return await asyncio.start_unix_server(serve, path=str(path))


async def listen_vsock(port: int, serve: Serve) -> asyncio.Server:
    if not hasattr(socket, "AF_VSOCK"):
        raise ChannelError("this Python has no AF_VSOCK support")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ChannelError(f"cannot listen on vsock port {port}: {exc}") from exc
    return await asyncio.start_server(serve, sock=sock)
