"""A guest agent built to misbehave, speaking ttrpc on a unix socket (the same kind of channel as
QEMU's virtio-serial agent port: a unix socket the host connects to) or, inside a VM of the
shipped image, on the guest's own virtio-serial port (hostile_guest.py: ``serve`` is what the
guest's channel hands each host connection).

It answers Check as SERVING and every other call as ``behaviour(method, request)`` says: actions
(an iterable, taken one at a time so that a flood is made as it is sent, never ahead in the
host's event loop), each raw bytes to send or a number of seconds to sleep. Helpers build the usual
misdeeds (a valid answer, a status, an answer on another stream, a header announcing more than
the protocol allows, garbage where protobuf belongs).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from google.protobuf.message import Message

from kabuto.protos import AGENT_SERVICE, agent_pb2, ttrpc_pb2
from kabuto.ttrpc import Code, MessageType, encode_frame, read_frame
from kabuto.ttrpc.framing import HEADER

Action = bytes | float
Behaviour = Callable[[int, str, ttrpc_pb2.Request], Iterable[Action]]


def answer(stream_id: int, message: Message | bytes) -> bytes:
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return encode_frame(stream_id, MessageType.RESPONSE, 0, ttrpc_pb2.Response(payload=payload)
                        .SerializeToString())


def status(stream_id: int, code: Code, text: str = "") -> bytes:
    response = ttrpc_pb2.Response()
    response.status.code = code
    response.status.message = text
    return encode_frame(stream_id, MessageType.RESPONSE, 0, response.SerializeToString())


def oversized_header(stream_id: int, length: int = 0xFFFFFFF0) -> bytes:
    return HEADER.pack(length, stream_id, MessageType.RESPONSE, 0)


class HostileAgent:
    """``async with HostileAgent(path, behaviour) as agent``: serves until closed; counts calls.
    (In a guest, ``path`` is None and the guest's channel calls ``serve`` for each connection.)"""

    def __init__(self, path: Path | None, behaviour: Behaviour) -> None:
        self.path = path
        self.behaviour = behaviour
        self.calls: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self.path is not None
        return f"unix://{self.path}"

    async def __aenter__(self) -> HostileAgent:
        assert self.path is not None
        self._server = await asyncio.start_unix_server(self.serve, str(self.path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # type: ignore[union-attr]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **_: object) -> None:
        self._tasks.add(task := asyncio.current_task())  # type: ignore[arg-type]
        try:
            while (frame := await read_frame(reader)) is not None:
                request = ttrpc_pb2.Request.FromString(frame.data)
                method = request.method
                self.calls.append(method)
                if request.service == AGENT_SERVICE and method == "Check":
                    actions: Iterable[Action] = [answer(frame.stream_id, agent_pb2.CheckResponse(
                        status=agent_pb2.CheckResponse.SERVING))]
                else:
                    actions = self.behaviour(frame.stream_id, method, request)
                # each call's misdeeds run on their own, as a real agent serves calls at once
                acting = asyncio.create_task(self._act(writer, actions))
                self._tasks.add(acting)
                acting.add_done_callback(self._tasks.discard)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _act(self, writer: asyncio.StreamWriter, actions: Iterable[Action]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            for action in actions:
                if isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                    await asyncio.sleep(0)  # drain returns at once below its high-water mark
                else:
                    await asyncio.sleep(action)
