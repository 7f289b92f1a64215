"""ttrpc message frames: a 10-byte header, then at most 4 MiB of data.

Header: data length (uint32, big endian), stream id (uint32, big endian), message type
(uint8), flags (uint8). The length is checked before anything is allocated, so a peer
announcing 4 GiB costs nothing but a ProtocolError.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass

from kabuto.errors import ProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA_LENGTH = 4 << 20  # 4 MiB, as containerd/ttrpc
# Once a header has arrived, its data must follow within this; a peer cannot stall a
# reader mid-frame forever.
DEFAULT_FRAME_TIMEOUT = 10.0


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1  # the sender sends no more data on this stream
    REMOTE_OPEN = 0x2  # request: more data frames follow from the sender
    NO_DATA = 0x4  # data frame carrying no data (only flags)


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        return encode_frame(self.stream_id, self.type, self.flags, self.data)


def encode_frame(stream_id: int, message_type: int, flags: int, data: bytes) -> bytes:
    if len(data) > MAX_DATA_LENGTH:
        raise ProtocolError(f"ttrpc message of {len(data)} bytes exceeds the {MAX_DATA_LENGTH}-byte limit")
    if not 0 <= stream_id <= 0xFFFFFFFF:
        raise ProtocolError(f"ttrpc stream id {stream_id} out of range")
    return HEADER.pack(len(data), stream_id, message_type, flags) + data


async def read_frame(
    reader: asyncio.StreamReader, frame_timeout: float = DEFAULT_FRAME_TIMEOUT
) -> Frame | None:
    """Read one frame; None on a clean EOF between frames.

    Waiting for a header has no bound (an idle connection is fine); once its first byte
    arrives the rest of the frame must arrive within ``frame_timeout`` seconds.
    Raises ProtocolError on a truncated or oversized frame or a stalled peer.
    """
    first = await reader.read(1)
    if not first:
        return None
    try:
        async with asyncio.timeout(frame_timeout):
            header = first + await reader.readexactly(HEADER_SIZE - 1)
            length, stream_id, message_type, flags = HEADER.unpack(header)
            if length > MAX_DATA_LENGTH:
                raise ProtocolError(
                    f"ttrpc peer announced a {length}-byte message, over the {MAX_DATA_LENGTH}-byte limit"
                )
            data = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"ttrpc frame truncated: connection ended after {len(exc.partial)} of {exc.expected} bytes"
        ) from None
    except TimeoutError:
        raise ProtocolError(f"ttrpc peer stalled over {frame_timeout:g}s in the middle of a frame") from None
    return Frame(stream_id, message_type, flags, data)
