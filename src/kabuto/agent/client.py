"""Host-side client of the guest agent: connect by address, call AgentService.

Every wait is bounded by a timeout; every failure becomes an AgentError that names the
address and the cause. The guest is untrusted: the ttrpc layer bounds what it can send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from kabuto.agent.address import AgentAddress, parse_agent_address
from kabuto.errors import AgentError, KabutoError
from kabuto.protos import agent_pb2
from kabuto.ttrpc import Client

SERVICE_NAME = "kabuto.agent.v1.AgentService"
DEFAULT_CALL_TIMEOUT = 10.0
# The hybrid-vsock answer is one short line ("OK <host port>\n"); more is a broken peer.
MAX_HANDSHAKE_LINE = 128
RETRY_INTERVAL = 0.05

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


class AgentClient:
    """A connection to the guest agent. Use ``await AgentClient.connect(address, timeout)``."""

    def __init__(self, address: AgentAddress, ttrpc: Client, call_timeout: float) -> None:
        self.address = address
        self._ttrpc = ttrpc
        self.call_timeout = call_timeout

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
                SERVICE_NAME, method, request, response_type, timeout=timeout or self.call_timeout
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
        await self._ttrpc.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def wait_for_agent(
    address: str, timeout: float, *, call_timeout: float = DEFAULT_CALL_TIMEOUT
) -> AgentClient:
    """Connect and Check until the agent answers SERVING, for at most ``timeout`` seconds.

    The agent starts after the guest boots. Until then a vsock or hybrid-vsock connect is
    refused and is retried; QEMU's virtio-serial socket accepts at once and holds the
    Check until the guest opens its port, so one long Check covers the boot.
    Returns the connected client; raises AgentError with the last cause.
    """
    parse_agent_address(address)  # a bad address fails now, not at the deadline
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: Exception | None = None
    while (remaining := deadline - loop.time()) > 0:
        client: AgentClient | None = None
        try:
            client = await AgentClient.connect(address, remaining, call_timeout=call_timeout)
            if await client.check(timeout=max(deadline - loop.time(), 0.001)):
                return client
            last_error = AgentError(f"agent at {address} answers but is not serving")
        except AgentError as exc:
            last_error = exc
        if client is not None:
            await client.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(RETRY_INTERVAL)
    raise AgentError(f"agent at {address} not ready within {timeout:g}s: {last_error or 'no attempt made'}")
