"""Client and server against each other: calls, concurrency, statuses, deadlines, streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from kabuto.errors import ProtocolError
from kabuto.protos import ttrpc_pb2
from kabuto.ttrpc import (
    Client,
    Code,
    ConnectionClosed,
    MessageType,
    RpcError,
    Server,
    ServerStream,
    current_call,
    encode_frame,
    read_frame,
    stream_method,
)

# Small protobuf messages that ship with the envelope; the tests need nothing bigger.
KV = ttrpc_pb2.KeyValue
SERVICE = "test.v1.Echo"


async def echo(request: KV) -> KV:
    return KV(key=request.key, value=request.value.upper())


async def sleep_then_echo(request: KV) -> KV:
    await asyncio.sleep(float(request.value))
    return KV(key=request.key, value=request.value)


async def fail(request: KV) -> KV:
    if request.key == "status":
        raise RpcError(Code.NOT_FOUND, f"no such thing: {request.value}")
    raise ValueError(f"boom {request.value}")


async def whoami(request: KV) -> KV:
    call = current_call.get()
    return KV(key=f"{call.service}/{call.method}", value=",".join(call.metadata.get(request.key, ())))


async def upper_stream(request: KV, stream: ServerStream) -> KV:
    """Echoes each data message upper-cased, then answers with how many there were."""
    count = 0
    while (message := await stream.recv(KV)) is not None:
        count += 1
        await stream.send(KV(key=message.key, value=message.value.upper()))
    return KV(key=request.key, value=str(count))


async def count_to(request: KV, stream: ServerStream) -> None:
    for number in range(int(request.value)):
        await stream.send(KV(key=str(number)))


def make_server(**settings: float) -> Server:
    server = Server(**settings)  # type: ignore[arg-type]
    server.register(
        SERVICE,
        {
            "Echo": (KV, echo),
            "Sleep": (KV, sleep_then_echo),
            "Fail": (KV, fail),
            "WhoAmI": (KV, whoami),
            "Upper": stream_method(KV, upper_stream),
            "CountTo": stream_method(KV, count_to),
        },
    )
    return server


@contextlib.asynccontextmanager
async def connected(server: Server) -> AsyncIterator[tuple[Client, asyncio.Task[None]]]:
    left, right = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=right)
    serving = asyncio.create_task(server.serve(server_reader, server_writer))
    client = Client(*await asyncio.open_connection(sock=left), name="test server")
    try:
        yield client, serving
    finally:
        await client.close()
        await asyncio.wait_for(serving, 5)


async def test_unary_call_round_trip() -> None:
    async with connected(make_server()) as (client, _):
        answer = await client.call(SERVICE, "Echo", KV(key="k", value="hello"), KV, timeout=5)
    assert (answer.key, answer.value) == ("k", "HELLO")


async def test_concurrent_calls_complete_out_of_order_on_one_connection() -> None:
    async with connected(make_server()) as (client, _):
        finished: list[str] = []

        async def call(delay: str) -> None:
            answer = await client.call(SERVICE, "Sleep", KV(key=delay, value=delay), KV, timeout=5)
            finished.append(answer.key)

        await asyncio.gather(*(call(d) for d in ["0.3", "0.0", "0.1", "0.2"]))
    assert finished == ["0.0", "0.1", "0.2", "0.3"]


async def test_many_concurrent_calls_beyond_the_server_limit_all_succeed() -> None:
    async with connected(make_server(max_concurrent_calls=4)) as (client, _):
        answers = await asyncio.gather(
            *(client.call(SERVICE, "Sleep", KV(key=str(n), value="0.01"), KV, timeout=10) for n in range(50))
        )
    assert sorted(int(a.key) for a in answers) == list(range(50))


async def test_client_uses_odd_increasing_stream_ids() -> None:
    async with connected(make_server()) as (client, _):
        ids = []
        for _ in range(3):
            await client.call(SERVICE, "Echo", KV(), KV, timeout=5)
            ids.append(client._next_stream_id - 2)
    assert ids == [1, 3, 5]


@pytest.mark.parametrize(("service", "method"), [("no.such.Service", "Echo"), (SERVICE, "NoSuchMethod")])
async def test_unknown_service_or_method_is_unimplemented(service: str, method: str) -> None:
    async with connected(make_server()) as (client, _):
        with pytest.raises(RpcError) as caught:
            await client.call(service, method, KV(), KV, timeout=5)
        assert caught.value.code == Code.UNIMPLEMENTED
        # The connection stays usable.
        assert (await client.call(SERVICE, "Echo", KV(value="a"), KV, timeout=5)).value == "A"


async def test_handler_exception_becomes_a_status_with_its_message() -> None:
    async with connected(make_server()) as (client, _):
        with pytest.raises(RpcError) as caught:
            await client.call(SERVICE, "Fail", KV(value="42"), KV, timeout=5)
        assert caught.value.code == Code.UNKNOWN
        assert "boom 42" in caught.value.message
        with pytest.raises(RpcError) as caught:
            await client.call(SERVICE, "Fail", KV(key="status", value="x"), KV, timeout=5)
        assert caught.value.code == Code.NOT_FOUND
        assert caught.value.message == "no such thing: x"


async def test_metadata_and_method_reach_the_handler() -> None:
    async with connected(make_server()) as (client, _):
        answer = await client.call(SERVICE, "WhoAmI", KV(key="ns"), KV, timeout=5, metadata={"ns": "k8s.io"})
    assert (answer.key, answer.value) == (f"{SERVICE}/WhoAmI", "k8s.io")


async def test_client_timeout_then_the_late_answer_is_dropped_and_the_connection_lives() -> None:
    async with connected(make_server()) as (client, _):
        with pytest.raises(RpcError) as caught:
            await client.call(SERVICE, "Sleep", KV(value="0.3"), KV, timeout=0.05)
        assert caught.value.code == Code.DEADLINE_EXCEEDED
        await asyncio.sleep(0.4)  # the server answers the abandoned call meanwhile
        assert (await client.call(SERVICE, "Echo", KV(value="b"), KV, timeout=5)).value == "B"


async def test_server_enforces_the_request_deadline() -> None:
    server = make_server()
    async with connected(server) as (client, _):
        # A client whose own wait is longer than the deadline it sends gets the server's verdict.
        stream_id = client._allocate_stream_id()
        future = asyncio.get_running_loop().create_future()
        client._pending[stream_id] = future
        await client._send(client._request_frame(stream_id, SERVICE, "Sleep", KV(value="5"), 0.05, None))
        response = await asyncio.wait_for(future, 3)
    assert response.status.code == Code.DEADLINE_EXCEEDED


async def test_close_fails_pending_calls_and_later_calls() -> None:
    async with connected(make_server()) as (client, _):
        pending = asyncio.create_task(client.call(SERVICE, "Sleep", KV(value="5"), KV, timeout=10))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ConnectionClosed):
            await pending
        with pytest.raises(ConnectionClosed):
            await client.call(SERVICE, "Echo", KV(), KV, timeout=1)


async def test_server_going_away_fails_pending_calls() -> None:
    left, right = socket.socketpair()
    client = Client(*await asyncio.open_connection(sock=left))
    pending = asyncio.create_task(client.call(SERVICE, "Echo", KV(), KV, timeout=10))
    await asyncio.sleep(0.05)
    right.close()
    with pytest.raises(ConnectionClosed):
        await pending
    assert client.closed
    await client.close()


async def test_calls_still_running_are_cancelled_when_the_client_leaves() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def wait_forever(request: KV) -> KV:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return request

    server = Server()
    server.register(SERVICE, {"Wait": (KV, wait_forever)})
    async with connected(server) as (client, _):
        call = asyncio.create_task(client.call(SERVICE, "Wait", KV(), KV, timeout=30))
        await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(cancelled.wait(), 5)
    with pytest.raises(ConnectionClosed):
        await call


async def test_bidirectional_stream() -> None:
    async with connected(make_server()) as (client, _):
        stream = await client.open_stream(SERVICE, "Upper", KV(key="req"), timeout=5, client_sends=True)
        received = []
        for word in ["a", "b", "c"]:
            await stream.send(KV(key=word, value=word * 2), timeout=5)
            message = await stream.recv(KV, timeout=5)
            assert message is not None
            received.append(message.value)
        await stream.close_send(timeout=5)
        assert await stream.recv(KV, timeout=5) is None
        assert received == ["AA", "BB", "CC"]
        with pytest.raises(ProtocolError):
            await stream.send(KV(), timeout=5)


async def test_server_stream_ends_with_its_response() -> None:
    async with connected(make_server()) as (client, _):
        stream = await client.open_stream(SERVICE, "CountTo", KV(value="5"), timeout=5, client_sends=False)
        keys = []
        while (message := await stream.recv(KV, timeout=5)) is not None:
            keys.append(message.key)
    assert keys == ["0", "1", "2", "3", "4"]


def test_registering_a_service_twice_is_refused() -> None:
    server = make_server()
    with pytest.raises(ValueError, match="already registered"):
        server.register(SERVICE, {})


def raw_request(stream_id: int, method: str, message: KV) -> bytes:
    request = ttrpc_pb2.Request(service=SERVICE, method=method, payload=message.SerializeToString())
    return encode_frame(stream_id, MessageType.REQUEST, 0, request.SerializeToString())


@pytest.mark.parametrize("peer_may_restart", [False, True])
async def test_a_restarted_stream_id_is_a_new_peer_only_when_allowed(peer_may_restart: bool) -> None:
    server = make_server()
    left, right = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=right)
    serving = asyncio.create_task(
        server.serve(server_reader, server_writer, peer_may_restart=peer_may_restart)
    )
    reader, writer = await asyncio.open_connection(sock=left)
    writer.write(raw_request(1, "Sleep", KV(value="30")))
    await asyncio.sleep(0.05)
    # A second client on the same byte stream starts again at stream id 1, as after a
    # virtio-serial reconnection the agent did not notice.
    writer.write(raw_request(1, "Echo", KV(value="new")))
    if peer_may_restart:
        frame = await asyncio.wait_for(read_frame(reader), 5)
        assert frame is not None and frame.stream_id == 1
        assert KV.FromString(ttrpc_pb2.Response.FromString(frame.data).payload).value == "NEW"
        writer.close()
    else:
        assert await asyncio.wait_for(read_frame(reader), 5) is None  # closed on us
    await asyncio.wait_for(serving, 5)
    writer.close()


async def test_a_service_still_loading_serves_once_loaded_and_others_meanwhile() -> None:
    loaded: asyncio.Future[dict[str, tuple[type[KV], object]]] = asyncio.get_running_loop().create_future()
    server = make_server()
    server.register_loading("test.v1.Late", loaded)
    async with connected(server) as (client, _):
        late_call = asyncio.create_task(client.call("test.v1.Late", "Echo", KV(value="late"), KV, timeout=10))
        # The ready service answers while the other one loads.
        assert (await client.call(SERVICE, "Echo", KV(value="now"), KV, timeout=5)).value == "NOW"
        assert not late_call.done()
        loaded.set_result({"Echo": (KV, echo)})
        assert (await late_call).value == "LATE"
        with pytest.raises(ValueError, match="already registered"):
            server.register("test.v1.Late", {})


async def test_a_service_that_fails_to_load_is_unavailable_with_the_reason() -> None:
    async def broken() -> dict[str, tuple[type[KV], object]]:
        raise ImportError("no module named 'kabuto.missing'")

    server = make_server()
    server.register_loading("test.v1.Broken", broken())
    async with connected(server) as (client, _):
        for _ in range(2):  # the first call waits for the failure, later ones find it
            with pytest.raises(RpcError) as caught:
                await client.call("test.v1.Broken", "Echo", KV(), KV, timeout=5)
            assert caught.value.code == Code.UNAVAILABLE
            assert "kabuto.missing" in caught.value.message


async def test_a_call_waits_for_a_loading_service_only_until_its_deadline() -> None:
    server = make_server()
    never: asyncio.Future[dict[str, tuple[type[KV], object]]] = asyncio.get_running_loop().create_future()
    server.register_loading("test.v1.Never", never)
    async with connected(server) as (client, _):
        stream_id = client._allocate_stream_id()
        future = asyncio.get_running_loop().create_future()
        client._pending[stream_id] = future
        await client._send(client._request_frame(stream_id, "test.v1.Never", "Echo", KV(), 0.05, None))
        response = await asyncio.wait_for(future, 5)
    assert response.status.code == Code.DEADLINE_EXCEEDED
    assert "still loading" in response.status.message
    never.cancel()
