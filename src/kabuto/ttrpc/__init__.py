"""containerd's ttrpc protocol over asyncio streams: client and server.

No maintained Python implementation of ttrpc exists, so this one is written by hand from
containerd/ttrpc's protocol description (PROTOCOL.md). It is shared by the guest agent
channel and the containerd shim (service containerd.task.v2.Task), so it knows nothing
about either: services are names mapped to methods, messages are protobuf.
"""

from kabuto.ttrpc.client import Client, ClientStream
from kabuto.ttrpc.framing import MAX_DATA_LENGTH, Flags, Frame, MessageType, encode_frame, read_frame
from kabuto.ttrpc.server import (
    CallContext,
    Method,
    Server,
    ServerStream,
    current_call,
    stream_method,
    unary_method,
)
from kabuto.ttrpc.status import Code, ConnectionClosed, RpcError

__all__ = [
    "MAX_DATA_LENGTH",
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "ConnectionClosed",
    "Flags",
    "Frame",
    "MessageType",
    "Method",
    "RpcError",
    "Server",
    "ServerStream",
    "current_call",
    "encode_frame",
    "read_frame",
    "stream_method",
    "unary_method",
]
