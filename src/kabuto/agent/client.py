"""Host-side client of the guest agent: connect by address, call AgentService.

Every wait is bounded by a timeout; every failure becomes an AgentError that names the
address and the cause. The guest is untrusted: the ttrpc layer bounds what it can send.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from kabuto.agent.address import AgentAddress, parse_agent_address
from kabuto.errors import AgentError, KabutoError
from kabuto.hypervisor.devices import PORT_LOCK_SUFFIX
from kabuto.protos import AGENT_SERVICE, agent_pb2
from kabuto.ttrpc import Client

DEFAULT_CALL_TIMEOUT = 10.0
# The hybrid-vsock answer is one short line ("OK <host port>\n"); more is a broken peer.
MAX_HANDSHAKE_LINE = 128
RETRY_INTERVAL = 0.05
# A unix:// agent address is a virtio-serial port: one host connection at a time. A process
# claims a port with an flock on this file beside its socket and keeps it while connected.

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class GuestDetails:
    kernel_release: str
    kernel_version: str
    machine: str
    mem_total_bytes: int
    online_cpus: int
    agent_version: str
    # The guest's boot timeline, in seconds since its kernel booted (see agent.proto).
    init_started_uptime_seconds: float
    agent_started_uptime_seconds: float
    agent_serving_uptime_seconds: float
    uptime_seconds: float
    is_init: bool

    @classmethod
    def from_message(cls, message: agent_pb2.GuestDetailsResponse) -> GuestDetails:
        return cls(
            kernel_release=message.kernel_release,
            kernel_version=message.kernel_version,
            machine=message.machine,
            mem_total_bytes=message.mem_total_bytes,
            online_cpus=message.online_cpus,
            agent_version=message.agent_version,
            init_started_uptime_seconds=message.init_started_uptime_seconds,
            agent_started_uptime_seconds=message.agent_started_uptime_seconds,
            agent_serving_uptime_seconds=message.agent_serving_uptime_seconds,
            uptime_seconds=message.uptime_seconds,
            is_init=message.is_init,
        )


async def _open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def _open_vsock(cid: int, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError("AF_VSOCK is not supported by this Python")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def _read_line(reader: asyncio.StreamReader, limit: int) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= limit:
            raise AgentError(f"hybrid vsock answer exceeds {limit} bytes without a newline")
        chunk = await reader.read(1)
        if not chunk:
            break
        line += chunk
    return bytes(line)


async def _open_hybrid_vsock(path: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        line = await _read_line(reader, MAX_HANDSHAKE_LINE)
        if not line.startswith(b"OK"):
            shown = line.decode("ascii", "replace").strip() or "the connection closed"
            raise AgentError(f"hybrid vsock refused CONNECT {port}: {shown}")
        return reader, writer
    except BaseException:
        writer.close()
        raise


async def open_agent_stream(address: AgentAddress) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The raw byte stream to the agent (no timeout here: callers bound it)."""
    if address.scheme == "unix":
        return await _open_unix(address.path)
    if address.scheme == "vsock":
        return await _open_vsock(address.cid, address.port)
    return await _open_hybrid_vsock(address.path, address.port)


def _try_claim(address: AgentAddress) -> int | None:
    """The locked fd claiming ``address``'s port, or None while another connection holds it."""
    lock_path = address.path + PORT_LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AgentError(f"agent at {address}: cannot open port lock {lock_path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise AgentError(f"agent at {address}: cannot lock {lock_path}: {exc}") from None
    return fd


async def claim_port(addresses: Sequence[str], timeout: float) -> tuple[str, int | None]:
    """Choose the agent address to connect to: (address, fd of the claim to release, or None).

    Unix sockets (virtio-serial ports) take one connection each: the first port no other
    connection has claimed is taken, waiting at most ``timeout`` seconds for one to free.
    Other transports accept many connections and need no claim.
    """
    if not addresses:
        raise AgentError("no agent address to connect to")
    parsed = [parse_agent_address(address) for address in addresses]
    if any(address.scheme != "unix" for address in parsed):
        return addresses[0], None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for address, text in zip(parsed, addresses, strict=True):
            if (fd := _try_claim(address)) is not None:
                return text, fd
        if loop.time() >= deadline:
            raise AgentError(f"agent at {addresses[0]}: all {len(addresses)} agent ports stayed busy "
                             f"for {timeout:g}s")
        await asyncio.sleep(RETRY_INTERVAL)


class AgentClient:
    """A connection to the guest agent. Use ``await AgentClient.connect(address, timeout)``."""

    def __init__(self, address: AgentAddress, ttrpc: Client, call_timeout: float) -> None:
        self.address = address
        self._ttrpc = ttrpc
        self.call_timeout = call_timeout
        #: the flock claiming this connection's port (see claim_port), released on close
        self.port_claim: int | None = None

    @classmethod
    async def connect(
        cls, address: str, timeout: float, *, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> AgentClient:
        parsed = parse_agent_address(address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await open_agent_stream(parsed)
        except TimeoutError:
            raise AgentError(f"agent at {address}: no connection within {timeout:g}s") from None
        except AgentError as exc:
            raise AgentError(f"agent at {address}: {exc}") from None
        except OSError as exc:
            raise AgentError(f"agent at {address}: cannot connect: {exc}") from None
        return cls(parsed, Client(reader, writer, name=f"agent at {address}"), call_timeout)

    async def call(
        self, method: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> M:
        """Call an AgentService method; any failure is an AgentError naming the address."""
        try:
            return await self._ttrpc.call(
                AGENT_SERVICE, method, request, response_type, timeout=timeout or self.call_timeout
            )
        except KabutoError as exc:
            raise AgentError(f"agent at {self.address}: {method} failed: {exc}") from exc

    async def check(self, timeout: float | None = None) -> bool:
        """True when the agent answers that it serves."""
        response = await self.call("Check", agent_pb2.CheckRequest(), agent_pb2.CheckResponse, timeout)
        return response.status == agent_pb2.CheckResponse.SERVING

    async def guest_details(self, timeout: float | None = None) -> GuestDetails:
        response = await self.call(
            "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse, timeout
        )
        return GuestDetails.from_message(response)

    async def online_cpus(self, cpus: int, wait: float) -> int:
        """Have the guest bring hot-added CPUs online until ``cpus`` are (waiting up to ``wait``
        seconds for them to appear); the number online afterwards."""
        request = agent_pb2.OnlineCpusRequest(cpus=cpus, timeout_seconds=wait)
        response = await self.call("OnlineCpus", request, agent_pb2.OnlineCpusResponse,
                                   wait + self.call_timeout)
        return response.online_cpus

    async def reseed_random_dev(self, data: bytes, timeout: float | None = None) -> None:
        """Have the guest mix ``data`` into its entropy pool and reseed its CRNG (Kata's
        ReseedRandomDev)."""
        await self.call("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data),
                        agent_pb2.ReseedRandomDevResponse, timeout)

    async def set_guest_date_time(self, sec: int, usec: int, timeout: float | None = None) -> None:
        """Set the guest's wall clock (Kata's SetGuestDateTime)."""
        await self.call("SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(sec=sec, usec=usec),
                        agent_pb2.SetGuestDateTimeResponse, timeout)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the guest to power off (the agent answers first)."""
        await self.call("Shutdown", agent_pb2.ShutdownRequest(), agent_pb2.ShutdownResponse, timeout)

    @property
    def ttrpc(self) -> Client:
        """The ttrpc connection, for the agent's other services (ContainerService) to share."""
        return self._ttrpc

    @property
    def closed(self) -> bool:
        return self._ttrpc.closed

    async def close(self) -> None:
        try:
            await self._ttrpc.close()
        finally:
            _release(self.port_claim)
            self.port_claim = None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _release(claim: int | None) -> None:
    if claim is not None:
        os.close(claim)  # closing the only fd of the lock file drops the flock


async def wait_for_agent(
    addresses: str | Sequence[str], timeout: float, *, call_timeout: float = DEFAULT_CALL_TIMEOUT,
    retry_interval: float = RETRY_INTERVAL,
) -> AgentClient:
    """Claim a free agent port of ``addresses`` (see claim_port), then connect and Check until
    the agent answers SERVING, all within ``timeout`` seconds, ``retry_interval`` seconds between
    attempts (Kata's dial_timeout_ms: its agent client sleeps that long after a failed dial).

    The agent starts after the guest boots. Until then a vsock or hybrid-vsock connect is
    refused and is retried; QEMU's virtio-serial socket accepts at once and holds the
    Check until the guest opens its port, so one long Check covers the boot.
    Returns the connected client; raises AgentError with the last cause.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # a bad address fails now, not at the deadline
    address, claim = await claim_port([addresses] if isinstance(addresses, str) else addresses, timeout)
    last_error: Exception | None = None
    try:
        while (remaining := deadline - loop.time()) > 0:
            client: AgentClient | None = None
            try:
                client = await AgentClient.connect(address, remaining, call_timeout=call_timeout)
                if await client.check(timeout=max(deadline - loop.time(), 0.001)):
                    client.port_claim, claim = claim, None
                    return client
                last_error = AgentError(f"agent at {address} answers but is not serving")
            except AgentError as exc:
                last_error = exc
            if client is not None:
                await client.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.sleep(retry_interval)
    finally:
        _release(claim)
    raise AgentError(f"agent at {address} not ready within {timeout:g}s: {last_error or 'no attempt made'}")
