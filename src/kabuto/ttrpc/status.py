"""Call status: gRPC status codes and the errors a ttrpc call raises."""

from __future__ import annotations

import enum

from kabuto.errors import KabutoError, ProtocolError
from kabuto.protos import ttrpc_pb2


class Code(enum.IntEnum):
    """The gRPC status codes, which ttrpc carries in Response.status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"code {code}"


class RpcError(KabutoError):
    """A call ended with a non-OK status, sent by the peer or decided locally (deadline)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code_name(code)}: {message}")

    def to_status(self) -> ttrpc_pb2.Status:
        return ttrpc_pb2.Status(code=int(self.code), message=self.message)

    @classmethod
    def from_status(cls, status: ttrpc_pb2.Status) -> RpcError:
        return cls(status.code, status.message)


class ConnectionClosed(ProtocolError):
    """The connection ended (EOF, reset, or closed locally) while a call needed it."""
