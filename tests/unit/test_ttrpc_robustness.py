"""An untrusted peer on either side: oversized, truncated and malformed frames, garbage.

Whatever the peer sends, the other side never hangs (every wait here is bounded), never
lets an exception escape its task, and never allocates what the peer announces.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kabuto.errors import KabutoError, ProtocolError
from kabuto.protos import ttrpc_pb2
from kabuto.ttrpc import Client, Code, ConnectionClosed, Flags, MessageType, RpcError, Server, encode_frame

KV = ttrpc_pb2.KeyValue
SERVICE = "test.v1.Echo"
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def stream_pair() -> tuple[Streams, Streams]:
    left, right = socket.socketpair()
    return await asyncio.open_connection(sock=left), await asyncio.open_connection(sock=right)


def header(length: int, stream_id: int, message_type: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream_id, message_type, flags)


def response_frame(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    response = ttrpc_pb2.Response(payload=payload)
    if code:
        response.status.code = code
        response.status.message = message
    return encode_frame(stream_id, MessageType.RESPONSE, Flags.NONE, response.SerializeToString())


def request_frame(
    stream_id: int, method: str = "Echo", payload: bytes = b"", service: str = SERVICE
) -> bytes:
    request = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    return encode_frame(stream_id, MessageType.REQUEST, Flags.NONE, request.SerializeToString())


# -- a hostile server, toward the host's client --------------------------------------------


async def call_against(reply: bytes, *, close_after: bool = False, frame_timeout: float = 0.5) -> Client:
    """Make one Echo call to a fake server that answers with ``reply`` raw bytes.

    Returns the client after the call failed or succeeded; raises what the call raised.
    """
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    client = Client(client_reader, client_writer, name="fake server", frame_timeout=frame_timeout)
    call = asyncio.create_task(client.call(SERVICE, "Echo", KV(key="k"), KV, timeout=3))
    await fake_reader.readexactly(10)  # whatever the request is, answer with the reply
    fake_writer.write(reply)
    if close_after:
        fake_writer.close()
    try:
        await asyncio.wait_for(call, 5)
    finally:
        await client.close()
        fake_writer.close()
    return client


@pytest.mark.parametrize("length", [(4 << 20) + 1, 0x7FFFFFFF, 0xFFFFFFFF])
async def test_client_refuses_an_oversized_message_without_allocating_it(length: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="limit"):
            await call_against(header(length, 1, MessageType.RESPONSE))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


async def test_client_oversized_header_closes_the_connection() -> None:
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    client = Client(client_reader, client_writer)
    call = asyncio.create_task(client.call(SERVICE, "Echo", KV(), KV, timeout=3))
    await fake_reader.readexactly(10)
    fake_writer.write(header(0xFFFFFFFF, 1, MessageType.RESPONSE))
    with pytest.raises(ProtocolError):
        await call
    assert client.closed
    # The client hung up: the fake server reads EOF after the request's remaining bytes.
    await asyncio.wait_for(fake_reader.read(), 5)
    assert fake_reader.at_eof()
    with pytest.raises(ProtocolError):
        await client.call(SERVICE, "Echo", KV(), KV, timeout=1)
    await client.close()


@pytest.mark.parametrize(
    "reply",
    [
        header(50, 1, MessageType.RESPONSE) + b"short",  # truncated body, then EOF
        b"\x00\x00\x00",  # truncated header, then EOF
        b"",  # plain EOF
    ],
)
async def test_client_truncated_frames_fail_the_call(reply: bytes) -> None:
    with pytest.raises(ConnectionClosed if not reply else ProtocolError):
        await call_against(reply, close_after=True)


async def test_client_peer_stalling_mid_frame_fails_the_call() -> None:
    with pytest.raises(ProtocolError, match="stalled"):
        await call_against(header(50, 1, MessageType.RESPONSE) + b"a few bytes", frame_timeout=0.1)


async def test_client_server_that_never_answers_hits_the_call_timeout() -> None:
    (client_reader, client_writer), (_fake_reader, fake_writer) = await stream_pair()
    async with Client(client_reader, client_writer) as client:
        with pytest.raises(RpcError) as caught:
            await client.call(SERVICE, "Echo", KV(), KV, timeout=0.1)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    fake_writer.close()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (encode_frame(1, 9, 0, b""), "unknown ttrpc message type 9"),
        (encode_frame(1, MessageType.RESPONSE, 0, b"\xff\xff\xff"), "cannot decode ttrpc response"),
        (encode_frame(1, MessageType.REQUEST, 0, b""), "server-initiated"),
        (encode_frame(1, MessageType.DATA, 0, b"x"), "data on unary stream"),
    ],
)
async def test_client_malformed_frames_are_protocol_errors(reply: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        await call_against(reply)


async def test_client_garbage_payload_fails_only_that_call() -> None:
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    async with Client(client_reader, client_writer) as client:
        call = asyncio.create_task(client.call(SERVICE, "Echo", KV(), KV, timeout=3))
        await fake_reader.readexactly(10)
        fake_writer.write(response_frame(1, payload=b"\xff\xff\xff\xff"))
        with pytest.raises(ProtocolError, match="response payload"):
            await call
        assert not client.closed


async def test_client_drops_a_response_for_an_unknown_stream() -> None:
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    async with Client(client_reader, client_writer) as client:
        call = asyncio.create_task(client.call(SERVICE, "Echo", KV(), KV, timeout=3))
        await fake_reader.readexactly(10)
        fake_writer.write(response_frame(99, KV(value="stray").SerializeToString()))
        fake_writer.write(response_frame(1, KV(value="right").SerializeToString()))
        assert (await call).value == "right"


async def test_client_error_status_from_the_peer() -> None:
    with pytest.raises(RpcError) as caught:
        await call_against(response_frame(1, code=Code.PERMISSION_DENIED, message="no"))
    assert (caught.value.code, caught.value.message) == (Code.PERMISSION_DENIED, "no")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_client_survives_arbitrary_garbage(garbage: bytes) -> None:
    async def scenario() -> None:
        try:
            await call_against(garbage, close_after=True, frame_timeout=0.2)
        except KabutoError:
            pass  # any of our errors is fine; hanging, crashing or other exceptions are not

    asyncio.run(asyncio.wait_for(scenario(), 10))


# -- a hostile client, toward the server ---------------------------------------------------


async def echo(request: KV) -> KV:
    return KV(key=request.key, value=request.value.upper())


async def serve_raw(*, frame_timeout: float = 0.5) -> tuple[asyncio.Task[None], Streams]:
    """A server with the Echo service, and the raw streams of a client connected to it."""
    server = Server(frame_timeout=frame_timeout)
    server.register(SERVICE, {"Echo": (KV, echo)})
    (server_reader, server_writer), peer = await stream_pair()
    return asyncio.create_task(server.serve(server_reader, server_writer)), peer


async def read_response(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    length, stream_id, message_type, _ = struct.unpack(">IIBB", await reader.readexactly(10))
    assert message_type == MessageType.RESPONSE
    return stream_id, ttrpc_pb2.Response.FromString(await reader.readexactly(length))


async def expect_closed_by_server(serving: asyncio.Task[None], reader: asyncio.StreamReader) -> None:
    await asyncio.wait_for(serving, 5)  # serve() returned: no exception escaped
    assert await asyncio.wait_for(reader.read(), 5) == b""


@pytest.mark.parametrize("length", [(4 << 20) + 1, 0xFFFFFFFF])
async def test_server_closes_on_an_oversized_message_without_allocating_it(length: int) -> None:
    tracemalloc.start()
    try:
        serving, (reader, writer) = await serve_raw()
        writer.write(header(length, 1, MessageType.REQUEST))
        await expect_closed_by_server(serving, reader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize(
    "data",
    [
        encode_frame(2, MessageType.REQUEST, 0, b""),  # even stream id
        encode_frame(1, 7, 0, b""),  # unknown type
        encode_frame(1, MessageType.RESPONSE, 0, b""),  # clients do not answer
        header(100, 1, MessageType.REQUEST) + b"truncated",
    ],
)
async def test_server_closes_the_connection_on_broken_framing(data: bytes) -> None:
    serving, (reader, writer) = await serve_raw(frame_timeout=0.2)
    writer.write(data)
    writer.write_eof()
    await expect_closed_by_server(serving, reader)


async def test_server_closes_a_client_stalling_mid_frame() -> None:
    serving, (reader, writer) = await serve_raw(frame_timeout=0.1)
    writer.write(header(100, 1, MessageType.REQUEST) + b"partial")
    await expect_closed_by_server(serving, reader)
    writer.close()


async def test_server_answers_undecodable_requests_and_keeps_serving() -> None:
    serving, (reader, writer) = await serve_raw()
    writer.write(encode_frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff"))  # not a Request
    writer.write(request_frame(3, payload=b"\xff\xff"))  # a Request, payload not a KeyValue
    writer.write(request_frame(5, payload=KV(value="ok").SerializeToString()))
    answers = dict([await read_response(reader) for _ in range(3)])
    assert answers[1].status.code == Code.INVALID_ARGUMENT
    assert answers[3].status.code == Code.INVALID_ARGUMENT
    assert KV.FromString(answers[5].payload).value == "OK"
    writer.close()
    await asyncio.wait_for(serving, 5)


async def test_server_ignores_data_for_an_unknown_stream() -> None:
    serving, (reader, writer) = await serve_raw()
    writer.write(encode_frame(41, MessageType.DATA, 0, b"stray"))
    writer.write(request_frame(1, payload=KV(value="x").SerializeToString()))
    stream_id, response = await read_response(reader)
    assert stream_id == 1 and KV.FromString(response.payload).value == "X"
    writer.close()
    await asyncio.wait_for(serving, 5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_server_survives_arbitrary_garbage(garbage: bytes) -> None:
    async def scenario() -> None:
        serving, (_reader, writer) = await serve_raw(frame_timeout=0.2)
        writer.write(garbage)
        writer.write_eof()
        await asyncio.wait_for(serving, 5)
        writer.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


async def test_client_memory_stays_flat_under_a_flood_of_stray_responses() -> None:
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    async with Client(client_reader, client_writer) as client:
        call = asyncio.create_task(client.call(SERVICE, "Echo", KV(), KV, timeout=30))
        await fake_reader.readexactly(10)
        stray = response_frame(99, b"x" * 1000)
        tracemalloc.start()
        try:
            for _ in range(5000):  # 5 MB of answers to nothing
                fake_writer.write(stray)
                await fake_writer.drain()
            fake_writer.write(response_frame(1, KV(value="right").SerializeToString()))
            assert (await call).value == "right"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


async def test_server_flooded_with_requests_runs_a_bounded_number_at_once() -> None:
    running = 0
    most_running = 0
    release = asyncio.Event()
    limit_reached = asyncio.Event()

    async def hold(request: KV) -> KV:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        if running == 4:
            limit_reached.set()
        await release.wait()
        running -= 1
        return request

    server = Server(max_concurrent_calls=4)
    server.register(SERVICE, {"Hold": (KV, hold)})
    (server_reader, server_writer), (reader, writer) = await stream_pair()
    serving = asyncio.create_task(server.serve(server_reader, server_writer))
    for stream_id in range(1, 2001, 2):  # 1000 requests, written without waiting for answers
        writer.write(request_frame(stream_id, "Hold"))
    await asyncio.wait_for(limit_reached.wait(), 10)
    await asyncio.sleep(0.1)  # room for any call beyond the limit to start (none may)
    assert most_running == 4
    release.set()
    answered = {(await read_response(reader))[0] for _ in range(1000)}
    assert answered == set(range(1, 2001, 2))
    assert most_running == 4
    writer.close()
    await asyncio.wait_for(serving, 5)


async def test_client_stream_keeps_its_data_when_the_connection_then_fails() -> None:
    (client_reader, client_writer), (fake_reader, fake_writer) = await stream_pair()
    async with Client(client_reader, client_writer) as client:
        stream = await client.open_stream(SERVICE, "Watch", KV(), timeout=5, client_sends=False)
        await fake_reader.readexactly(10)
        for number in range(70):  # more than a stream queues: the reader waits for us
            fake_writer.write(encode_frame(1, MessageType.DATA, 0, KV(key=str(number)).SerializeToString()))
        fake_writer.close()
        keys = []
        with pytest.raises(ConnectionClosed):
            while (message := await stream.recv(KV, timeout=5)) is not None:
                keys.append(message.key)
    assert keys == [str(n) for n in range(70)]
