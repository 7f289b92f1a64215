"""Frame encoding and reading: round trips and every way a frame can be broken."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kabuto.errors import ProtocolError
from kabuto.ttrpc import MAX_DATA_LENGTH, Frame, MessageType, encode_frame, read_frame


def reader_with(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    assert encode_frame(0x01020304, MessageType.DATA, 0x05, b"xyz") == (
        b"\x00\x00\x00\x03" + b"\x01\x02\x03\x04" + b"\x03" + b"\x05" + b"xyz"
    )


@given(
    stream_id=st.integers(0, 0xFFFFFFFF),
    message_type=st.integers(0, 255),
    flags=st.integers(0, 255),
    data=st.binary(max_size=4096),
)
def test_round_trip(stream_id: int, message_type: int, flags: int, data: bytes) -> None:
    async def read_back() -> Frame | None:
        return await read_frame(reader_with(encode_frame(stream_id, message_type, flags, data)))

    assert asyncio.run(read_back()) == Frame(stream_id, message_type, flags, data)


async def test_largest_allowed_message_round_trips() -> None:
    data = bytes(range(256)) * (MAX_DATA_LENGTH // 256)
    assert len(data) == MAX_DATA_LENGTH
    frame = await read_frame(reader_with(encode_frame(1, MessageType.RESPONSE, 0, data)))
    assert frame is not None and frame.data == data


async def test_several_frames_in_a_row_then_clean_eof() -> None:
    reader = reader_with(
        encode_frame(1, 1, 0, b"a") + encode_frame(3, 1, 0, b"") + encode_frame(5, 3, 1, b"c")
    )
    frames = [await read_frame(reader) for _ in range(3)]
    assert [(f.stream_id, f.data) for f in frames if f] == [(1, b"a"), (3, b""), (5, b"c")]
    assert await read_frame(reader) is None


def test_encoding_refuses_oversized_data() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(1, MessageType.REQUEST, 0, bytes(MAX_DATA_LENGTH + 1))


@pytest.mark.parametrize("length", [MAX_DATA_LENGTH + 1, 0xFFFFFFFF])
async def test_oversized_length_is_refused_without_waiting_or_allocating(length: int) -> None:
    # No EOF and no data after the header: a reader that tried to read the body would hang.
    reader = reader_with(struct.pack(">IIBB", length, 1, MessageType.RESPONSE, 0), eof=False)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="limit"):
            await asyncio.wait_for(read_frame(reader), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # a partial header
        struct.pack(">IIBB", 100, 1, 2, 0) + b"only part of it",
    ],
)
async def test_truncated_frame_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="truncated"):
        await read_frame(reader_with(data))


async def test_peer_stalling_mid_frame_is_bounded() -> None:
    reader = reader_with(struct.pack(">IIBB", 10, 1, 2, 0) + b"abc", eof=False)
    with pytest.raises(ProtocolError, match="stalled"):
        await read_frame(reader, frame_timeout=0.05)
