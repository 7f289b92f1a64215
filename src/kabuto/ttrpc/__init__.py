"""containerd's ttrpc protocol over asyncio streams: client and server.

No maintained Python implementation of ttrpc exists, so this one is written by hand from
containerd/ttrpc's protocol description (PROTOCOL.md). It is shared by the guest agent
channel and the containerd shim (service containerd.task.v2.Task), so it knows nothing
about either: services are names mapped to methods, messages are protobuf.

The client is imported on first use: the guest agent, a server, starts without it (a tenth of a
CPU-second under TCG, docs/benchmarks.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from kabuto.ttrpc.client import Client, ClientStream

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


def __getattr__(name: str) -> object:
    if name in ("Client", "ClientStream"):
        from kabuto.ttrpc import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
