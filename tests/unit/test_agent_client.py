"""The host's AgentClient: addresses, the real guest agent run on the host, hybrid vsock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from kabuto.agent import AgentAddress, AgentClient, parse_agent_address, wait_for_agent
from kabuto.agent.client import claim_port
from kabuto.errors import AgentError
from kabuto.guest.service import AgentService
from kabuto.protos import AGENT_SERVICE, CONTAINER_SERVICE, agent_pb2
from kabuto.ttrpc import Code, RpcError, Server

AGENT_START_TIMEOUT = 30.0


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("unix:///run/kabuto/x/agent.sock", AgentAddress("unix", path="/run/kabuto/x/agent.sock")),
        ("vsock://3:1024", AgentAddress("vsock", cid=3, port=1024)),
        ("hvsock:///run/fc/v.sock:1024", AgentAddress("hvsock", path="/run/fc/v.sock", port=1024)),
        ("hvsock:///a:b/v.sock:5", AgentAddress("hvsock", path="/a:b/v.sock", port=5)),
    ],
)
def test_parse_agent_address(address: str, parsed: AgentAddress) -> None:
    assert parse_agent_address(address) == parsed
    assert str(parsed) == address


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("/run/agent.sock", "expected unix://"),
        ("tcp://1.2.3.4:5", "unknown scheme 'tcp'"),
        ("unix://relative.sock", "absolute path"),
        ("vsock://3", "vsock://CID:PORT"),
        ("vsock://x:1", "vsock://CID:PORT"),
        ("vsock://3:port", "port 'port'"),
        ("vsock://3:99999999999", "port"),
        ("hvsock:///run/v.sock", "socket:PORT"),
        ("hvsock://v.sock:3", "hvsock:///path"),
    ],
)
def test_bad_addresses_are_named_in_the_error(address: str, reason: str) -> None:
    with pytest.raises(AgentError, match=reason) as caught:
        parse_agent_address(address)
    assert repr(address) in str(caught.value)


@contextlib.asynccontextmanager
async def guest_agent(socket_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """The real guest agent (``python -m kabuto.guest``) listening on a Unix socket."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kabuto.guest", "--listen", f"unix://{socket_path}", "--log-level", "WARNING"
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


async def test_client_against_the_guest_agent(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/agent.sock"
    async with guest_agent(tmp_path / "agent.sock") as process:
        client = await wait_for_agent(address, AGENT_START_TIMEOUT)
        async with client:
            assert await client.check()
            details = await client.guest_details()
            # On the host the "guest" is this machine.
            assert details.kernel_release == os.uname().release
            assert details.machine == os.uname().machine
            assert details.online_cpus >= 1
            assert details.mem_total_bytes > 0
            assert details.agent_version
            assert (
                0
                < details.init_started_uptime_seconds
                <= details.agent_started_uptime_seconds
                <= details.agent_serving_uptime_seconds
                <= details.uptime_seconds
            )
            assert not details.is_init
            # Several host processes connect over time; each gets a fresh session.
            async with await AgentClient.connect(address, 5) as second:
                assert await second.check()
            assert await client.check()
            # Other services of the agent share the connection.
            shared = await client.ttrpc.call(
                AGENT_SERVICE, "Check", agent_pb2.CheckRequest(), agent_pb2.CheckResponse, timeout=5
            )
            assert shared.status == agent_pb2.CheckResponse.SERVING
            # ContainerService loads in the background; once there, it knows its methods.
            with pytest.raises(RpcError) as caught:
                await client.ttrpc.call(
                    CONTAINER_SERVICE,
                    "NoSuchMethod",
                    agent_pb2.CheckRequest(),
                    agent_pb2.CheckResponse,
                    timeout=30,
                )
            assert caught.value.code == Code.UNIMPLEMENTED
            assert "method" in caught.value.message
            await client.shutdown()
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_wait_for_agent_covers_an_agent_that_starts_late(tmp_path: Path) -> None:
    socket_path = tmp_path / "agent.sock"
    waiting = asyncio.create_task(wait_for_agent(f"unix://{socket_path}", AGENT_START_TIMEOUT))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # no socket yet: it keeps retrying
    async with guest_agent(socket_path):
        client = await waiting
        assert await client.check()
        await client.close()


async def test_wait_for_agent_gives_up_at_its_deadline(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"not ready within 0.3s.*cannot connect"):
        await wait_for_agent(f"unix://{tmp_path}/nothing.sock", 0.3)


async def test_wait_for_agent_retries_at_its_interval(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 0
    connect = AgentClient.connect

    async def counted(address: str, timeout: float, **kwargs: object) -> AgentClient:
        nonlocal attempts
        attempts += 1
        return await connect(address, timeout, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AgentClient, "connect", counted)
    with pytest.raises(AgentError, match=r"not ready within 0\.5s"):
        await wait_for_agent(f"unix://{tmp_path}/nothing.sock", 0.5, retry_interval=0.2)
    # one attempt at once, then one every 0.2s (Kata's dial_timeout_ms), never a busy loop
    assert 2 <= attempts <= 3


async def test_connect_failure_names_the_address(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/missing.sock"
    with pytest.raises(AgentError, match=f"agent at {address}: cannot connect"):
        await AgentClient.connect(address, 1)


async def test_call_failure_names_the_address_and_method(tmp_path: Path) -> None:
    # A peer that accepts and never answers.
    path = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(path))
    async with server, await AgentClient.connect(f"unix://{path}", 1, call_timeout=0.1) as client:
        with pytest.raises(AgentError, match=rf"agent at unix://{path}: Check failed: DEADLINE_EXCEEDED"):
            await client.check()


async def test_vsock_connect_errors_are_agent_errors() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this Python has no AF_VSOCK")
    # CID 1 is the local loopback; nothing listens on this port here.
    with pytest.raises(AgentError, match=r"agent at vsock://1:4294967295"):
        await AgentClient.connect("vsock://1:4294967295", 0.5)


# -- hybrid vsock --------------------------------------------------------------------------

Handshake = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def hybrid_vsock(path: Path, handshake: Handshake) -> AsyncIterator[list[bytes]]:
    """A fake Firecracker/Cloud Hypervisor vsock socket: a CONNECT line, then the agent."""
    agent = Server()
    agent.register(AGENT_SERVICE, AgentService(started_uptime=0.0).methods())
    requests: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readline())
        if await handshake(reader, writer):
            await agent.serve(reader, writer)
        else:
            writer.close()

    server = await asyncio.start_unix_server(on_connect, path=str(path))
    async with server:
        yield requests


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"OK 1073741824\n")
    return True


async def test_hybrid_vsock_handshake_then_agent_calls(tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    async with hybrid_vsock(path, accept) as requests:
        async with await AgentClient.connect(f"hvsock://{path}:1024", 5) as client:
            assert await client.check()
            assert (await client.guest_details()).kernel_release == os.uname().release
    assert requests == [b"CONNECT 1024\n"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"", "refused CONNECT 1024: the connection closed"),
        (b"ERR no listener\n", "refused CONNECT 1024: ERR no listener"),
        (b"x" * 1000, "exceeds 128 bytes"),
    ],
)
async def test_hybrid_vsock_refusals(tmp_path: Path, answer: bytes, reason: str) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer)
        await writer.drain()
        return False

    path = tmp_path / "v.sock"
    async with hybrid_vsock(path, refuse):
        with pytest.raises(AgentError, match=rf"agent at hvsock://{path}:1024: .*{reason}"):
            await AgentClient.connect(f"hvsock://{path}:1024", 5)


async def test_hybrid_vsock_silent_peer_hits_the_connect_timeout(tmp_path: Path) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3600)
        return False

    path = tmp_path / "v.sock"
    async with hybrid_vsock(path, stall):
        with pytest.raises(AgentError, match=r"no connection within 0\.2s"):
            await AgentClient.connect(f"hvsock://{path}:1024", 0.2)


@contextlib.asynccontextmanager
async def agent_ports(directory: Path, count: int) -> AsyncIterator[list[str]]:
    """``count`` Unix sockets served by one in-process agent, as a VMM's virtio-serial ports are."""
    server = Server()
    server.register(AGENT_SERVICE, AgentService(started_uptime=0.0).methods())
    listeners = [await asyncio.start_unix_server(server.serve, path=str(directory / f"agent-{i}.sock"))
                 for i in range(count)]
    try:
        yield [f"unix://{directory}/agent-{i}.sock" for i in range(count)]
    finally:
        for listener in listeners:
            listener.close()


async def test_each_client_claims_a_port_of_its_own(tmp_path: Path) -> None:
    async with agent_ports(tmp_path, 2) as addresses:
        first = await wait_for_agent(addresses, 5)
        second = await wait_for_agent(addresses, 5)
        assert (str(first.address), str(second.address)) == (addresses[0], addresses[1])
        # every port taken: a third waits, bounded, and says so
        with pytest.raises(AgentError, match=r"all 2 agent ports stayed busy for 0\.2s"):
            await wait_for_agent(addresses, 0.2)
        waiting = asyncio.create_task(wait_for_agent(addresses, 5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await first.close()  # its port is free again
        third = await waiting
        assert str(third.address) == addresses[0] and await third.check()
        await second.close()
        await third.close()


async def test_a_failed_connection_releases_its_claim(tmp_path: Path) -> None:
    address = f"unix://{tmp_path}/nothing.sock"
    with pytest.raises(AgentError, match=r"not ready within 0\.2s"):
        await wait_for_agent([address], 0.2)
    async with agent_ports(tmp_path, 1):
        (tmp_path / "nothing.sock").symlink_to(tmp_path / "agent-0.sock")
        async with await wait_for_agent([address], 5) as client:
            assert await client.check()


async def test_channels_taking_many_connections_need_no_claim() -> None:
    assert await claim_port(["vsock://3:1024"], 1) == ("vsock://3:1024", None)
    assert await claim_port(["hvsock:///run/fc/v.sock:1024"], 1) == ("hvsock:///run/fc/v.sock:1024", None)
