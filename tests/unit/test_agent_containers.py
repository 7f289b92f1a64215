"""The host's ContainerClient against a scripted ContainerService over real ttrpc: polling,
chunking, bounds on what the (untrusted) guest answers, and error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kabuto.agent import AgentClient
from kabuto.agent.containers import ContainerCallError, ContainerClient, Storage
from kabuto.errors import AgentError
from kabuto.protos import CONTAINER_SERVICE
from kabuto.protos import containers_pb2 as pb
from kabuto.ttrpc import Code, RpcError, Server, unary_method


class FakeGuest:
    """Records each request; answers with ``script[method]`` (a callable of the request)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.script: dict[str, Callable[[Any], Any]] = {}

    def methods(self) -> dict[str, Any]:
        methods = {}
        for service in pb.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request_type = getattr(pb, method.input_type.name)
                response_type = getattr(pb, method.output_type.name)
                methods[method.name] = unary_method(request_type, self._handler(method.name, response_type))
        return methods

    def _handler(self, name: str, response_type: Any) -> Callable[[Any], Any]:
        async def handle(request: Any) -> Any:
            self.requests.append((name, request))
            answer = self.script.get(name)
            result = answer(request) if answer else None
            if asyncio.iscoroutine(result):
                result = await result
            return result if result is not None else response_type()

        return handle

    def calls(self, name: str) -> list[Any]:
        return [request for method, request in self.requests if method == name]


@pytest.fixture
async def guest_and_client(tmp_path: Path) -> AsyncIterator[tuple[FakeGuest, ContainerClient]]:
    guest = FakeGuest()
    server = Server()
    server.register(CONTAINER_SERVICE, guest.methods())
    socket_path = tmp_path / "agent.sock"
    listener = await asyncio.start_unix_server(server.serve, path=str(socket_path))
    agent = await AgentClient.connect(f"unix://{socket_path}", 5.0, call_timeout=5.0)
    try:
        yield guest, ContainerClient(agent, poll_interval=0.5)
    finally:
        await agent.close()
        listener.close()
        await listener.wait_closed()


def test_the_service_names_are_the_protos_own() -> None:
    """Client and guest both name the services by these constants; the .proto files decide them."""
    from kabuto.protos import AGENT_SERVICE, agent_pb2

    assert CONTAINER_SERVICE == pb.DESCRIPTOR.services_by_name["ContainerService"].full_name
    assert AGENT_SERVICE == agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


async def test_create_container_sends_the_spec_and_rootfs(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    guest.script["CreateContainer"] = lambda _: pb.CreateContainerResponse(pid=42)
    spec = {"root": {"path": "/run/kabuto/shared/c1/rootfs"}, "process": {"args": ["true"]}}
    rootfs = Storage("/dev/vdb", "/run/kabuto/shared/c1/rootfs", "ext4", ["ro"])
    assert await client.create_container("c1", spec, rootfs=rootfs) == 42
    assert await client.create_container("c2", json.dumps(spec).encode()) == 42
    first, second = guest.calls("CreateContainer")
    assert json.loads(first.oci_spec_json) == spec == json.loads(second.oci_spec_json)
    assert (first.rootfs.source, first.rootfs.fstype, list(first.rootfs.options)) == (
        "/dev/vdb",
        "ext4",
        ["ro"],
    )
    assert not second.HasField("rootfs")


async def test_guest_errors_keep_their_code_and_message(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client

    def refuse(_: Any) -> None:
        raise RpcError(Code.NOT_FOUND, 'container "x" does not exist')

    guest.script["StartContainer"] = refuse
    with pytest.raises(ContainerCallError) as info:
        await client.start_container("x")
    assert info.value.code == Code.NOT_FOUND
    assert info.value.message == 'container "x" does not exist'
    assert isinstance(info.value, AgentError) and "StartContainer" in str(info.value)


async def test_a_poll_that_found_nothing_is_repeated(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    answers = iter([None, None, 7])

    def wait(_: Any) -> pb.WaitProcessResponse:
        status = next(answers)
        if status is None:
            raise RpcError(Code.DEADLINE_EXCEEDED, "WaitProcess: nothing yet, call again")
        return pb.WaitProcessResponse(exit_status=status)

    guest.script["WaitProcess"] = wait
    assert await client.wait_process("c1", "e1", timeout=30) == 7
    assert len(guest.calls("WaitProcess")) == 3


async def test_polling_stops_at_the_callers_timeout(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client

    async def never(_: Any) -> None:
        await asyncio.sleep(3600)

    guest.script["ReadStdout"] = never
    with pytest.raises(AgentError, match=r"ReadStdout: no answer within 1\.2s"):
        await client.read_stdout("c1", timeout=1.2)
    # Each poll was bounded by the poll interval, well below the timeout.
    assert len(guest.calls("ReadStdout")) >= 2


async def test_a_guest_sending_more_than_asked_is_refused(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    guest.script["ReadStderr"] = lambda request: pb.ReadStreamResponse(data=b"x" * (request.max_len + 1))
    with pytest.raises(AgentError, match="sent 11 bytes, asked 10"):
        await client.read_stderr("c1", max_len=10, timeout=5)
    guest.script["WriteStdin"] = lambda request: pb.WriteStdinResponse(written=len(request.data) + 1)
    with pytest.raises(AgentError, match="claims more"):
        await client.write_stdin("c1", "", b"abc", timeout=5)


async def test_stdin_is_written_in_chunks_until_all_is_taken(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    received = bytearray()

    def take_half(request: Any) -> pb.WriteStdinResponse:
        taken = max(1, len(request.data) // 2)  # the pipe had room for part of it
        received.extend(request.data[:taken])
        return pb.WriteStdinResponse(written=taken)

    guest.script["WriteStdin"] = take_half
    payload = bytes(range(256)) * 10000  # 2.5 MB: more than one chunk
    assert await client.write_stdin("c1", "e1", payload, timeout=30) == len(payload)
    assert bytes(received) == payload
    assert max(len(r.data) for r in guest.calls("WriteStdin")) <= 1 << 20


async def test_file_copies_go_in_chunks_and_out_within_a_bound(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    stored = bytearray()

    def copy_in(request: Any) -> None:
        if request.offset == 0:
            stored.clear()
        assert request.offset == len(stored)
        stored.extend(request.data)

    def copy_out(request: Any) -> pb.CopyFileOutResponse:
        data = bytes(stored[request.offset : request.offset + request.max_len])
        return pb.CopyFileOutResponse(data=data, size=len(stored), mode=0o640)

    guest.script["CopyFileIn"] = copy_in
    guest.script["CopyFileOut"] = copy_out
    payload = bytes(range(256)) * 9000
    await client.copy_file_in("/tmp/f", payload, 0o640, container_id="c1")
    assert bytes(stored) == payload
    assert {r.container_id for r in guest.calls("CopyFileIn")} == {"c1"}
    assert await client.copy_file_out("/tmp/f", container_id="c1") == payload
    with pytest.raises(AgentError, match="larger than 1000 bytes"):
        await client.copy_file_out("/tmp/f", max_size=1000)
    await client.copy_file_in("/tmp/empty", b"")
    assert guest.calls("CopyFileIn")[-1].path == "/tmp/empty"  # an empty file is still created

    guest.script["CopyFileOut"] = lambda request: pb.CopyFileOutResponse(data=b"x" * 10, size=1 << 40)
    with pytest.raises(AgentError, match="larger than"):
        await client.copy_file_out("/tmp/lying")


async def test_stats_leave_unknown_numbers_unset(guest_and_client: tuple[FakeGuest, ContainerClient]) -> None:
    guest, client = guest_and_client
    guest.script["StatsContainer"] = lambda _: pb.StatsContainerResponse(
        memory_usage_bytes=4096, pids_current=0
    )
    stats = await client.stats_container("c1")
    assert stats.memory_usage_bytes == 4096 and stats.pids_current == 0
    assert stats.memory_limit_bytes is None and stats.cpu_usage_usec is None


async def test_sandbox_signal_and_resize_requests(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    guest, client = guest_and_client
    await client.create_sandbox(
        hostname="sb",
        storages=[Storage("kabuto-shared", "/run/kabuto/shared", "9p", ["trans=virtio", "version=9p2000.L"])],
        sandbox_id="sb1",
    )
    await client.signal_process("c1", "", 15, all_processes=True)
    await client.tty_win_resize("c1", "e1", 40, 120)
    guest.script["ListProcesses"] = lambda _: pb.ListProcessesResponse(pids=[1, 7])
    assert await client.list_processes("c1") == [1, 7]
    (sandbox,) = guest.calls("CreateSandbox")
    assert sandbox.storages[0].fstype == "9p" and sandbox.storages[0].options == [
        "trans=virtio",
        "version=9p2000.L",
    ]
    (signal_request,) = guest.calls("SignalProcess")
    assert (signal_request.signal, signal_request.all) == (15, True)
    (resize,) = guest.calls("TtyWinResize")
    assert (resize.rows, resize.cols) == (40, 120)


async def test_a_closed_connection_is_an_agent_error(
    guest_and_client: tuple[FakeGuest, ContainerClient],
) -> None:
    _, client = guest_and_client
    await client.agent.close()
    with pytest.raises(AgentError, match="RemoveContainer failed"):
        await client.remove_container("c1")
