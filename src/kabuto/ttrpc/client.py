"""ttrpc client: many concurrent calls over one connection, each bounded by a timeout.

The peer may be untrusted (a guest): frames are size-checked before allocation, a stall
mid-frame is bounded, a broken frame closes the connection and fails every pending call,
and a response for a stream nobody waits for (a call that already timed out) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from kabuto.errors import ProtocolError
from kabuto.protos import ttrpc_pb2
from kabuto.ttrpc.framing import DEFAULT_FRAME_TIMEOUT, Flags, Frame, MessageType, encode_frame, read_frame
from kabuto.ttrpc.status import Code, ConnectionClosed, RpcError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

MAX_STREAM_ID = 0xFFFFFFFF
# Data frames a stream holds for its reader before the connection stops reading.
STREAM_QUEUE_FRAMES = 64
CLOSE_TIMEOUT = 2.0


def _parse(message_type: type[M], data: bytes, what: str) -> M:
    message = message_type()
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"cannot decode {what} as {message_type.DESCRIPTOR.full_name}: {exc}") from None
    return message


def _status_error(response: ttrpc_pb2.Response) -> RpcError | None:
    if response.HasField("status") and response.status.code != Code.OK:
        return RpcError.from_status(response.status)
    return None


class ClientStream:
    """A non-unary call: data messages both ways, ended by the server's response."""

    def __init__(self, client: Client, stream_id: int, *, local_closed: bool) -> None:
        self._client = client
        self.stream_id = stream_id
        # None wakes a reader waiting when the connection fails (see _fail).
        self._incoming: asyncio.Queue[Frame | None] = asyncio.Queue(STREAM_QUEUE_FRAMES)
        self._error: ProtocolError | None = None
        self._local_closed = local_closed
        self._finished = False

    async def send(self, message: Message, timeout: float) -> None:
        if self._local_closed:
            raise ProtocolError(f"ttrpc stream {self.stream_id} is closed for sending")
        await self._client._send(
            encode_frame(self.stream_id, MessageType.DATA, Flags.NONE, message.SerializeToString()), timeout
        )

    async def close_send(self, timeout: float) -> None:
        if self._local_closed:
            return
        self._local_closed = True
        await self._client._send(
            encode_frame(self.stream_id, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b""), timeout
        )

    async def recv(self, message_type: type[M], timeout: float) -> M | None:
        """The next data message from the server; None once the stream has ended."""
        if self._finished:
            return None
        if self._error is not None and self._incoming.empty():
            self._finish()
            raise self._error
        try:
            async with asyncio.timeout(timeout):
                item = await self._incoming.get()
        except TimeoutError:
            message = f"no data on stream {self.stream_id} within {timeout:g}s"
            raise RpcError(Code.DEADLINE_EXCEEDED, message) from None
        if item is None:
            self._finish()
            raise self._error or ConnectionClosed(f"stream {self.stream_id} ended")
        if item.type == MessageType.RESPONSE:
            self._finish()
            response = _parse(ttrpc_pb2.Response, item.data, "ttrpc response")
            error = _status_error(response)
            if error:
                raise error
            return None
        if item.flags & Flags.REMOTE_CLOSED:
            self._finish()
        if item.flags & Flags.NO_DATA:
            return None
        return _parse(message_type, item.data, f"data on stream {self.stream_id}")

    def _finish(self) -> None:
        self._finished = True
        self._client._streams.pop(self.stream_id, None)

    async def _deliver(self, frame: Frame) -> None:
        await self._incoming.put(frame)

    def _fail(self, error: ProtocolError) -> None:
        # Never blocks, loses no data: frames already queued are read before the error.
        self._error = error
        if not self._incoming.full():
            self._incoming.put_nowait(None)


class Client:
    """A ttrpc client over an asyncio stream pair; the connection's reader runs in a task.

    ``name`` appears in errors (e.g. the agent address).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str = "ttrpc peer",
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._frame_timeout = frame_timeout
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._streams: dict[int, ClientStream] = {}
        self._write_lock = asyncio.Lock()
        self._closed: ProtocolError | None = None
        self._read_task = asyncio.create_task(self._read_loop(), name=f"ttrpc-client-read {name}")

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        """One unary call; raises RpcError (status, or DEADLINE_EXCEEDED after ``timeout``
        seconds), ConnectionClosed or ProtocolError."""
        stream_id = self._allocate_stream_id()
        future: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._send(self._request_frame(stream_id, service, method, request, timeout, metadata))
                response = await future
        except TimeoutError:
            raise RpcError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method} on {self.name}: no answer within {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(stream_id, None)
        error = _status_error(response)
        if error:
            raise error
        return _parse(response_type, response.payload, f"{service}/{method} response payload")

    async def open_stream(
        self,
        service: str,
        method: str,
        request: Message,
        *,
        timeout: float,
        client_sends: bool,
        metadata: Mapping[str, str] | None = None,
    ) -> ClientStream:
        """Start a streaming call. ``client_sends``: more data messages follow from us."""
        stream_id = self._allocate_stream_id()
        stream = ClientStream(self, stream_id, local_closed=not client_sends)
        self._streams[stream_id] = stream
        flags = Flags.REMOTE_OPEN if client_sends else Flags.REMOTE_CLOSED
        try:
            await self._send(
                self._request_frame(stream_id, service, method, request, timeout, metadata, flags), timeout
            )
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        return stream

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionClosed."""
        if self._closed is None:
            self._closed = ConnectionClosed(f"ttrpc connection to {self.name} closed")
        self._read_task.cancel()
        # the read task's end, not a cancellation of the caller (that one propagates)
        await asyncio.gather(self._read_task, return_exceptions=True)
        await self._close_writer()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _closed_error(self) -> ProtocolError:
        # A fresh exception each time: re-raising one instance would pile up tracebacks.
        assert self._closed is not None
        return type(self._closed)(str(self._closed))

    def _allocate_stream_id(self) -> int:
        if self._closed is not None:
            raise self._closed_error()
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError(f"ttrpc stream ids exhausted on the connection to {self.name}")
        self._next_stream_id += 2  # client-initiated streams are odd
        return stream_id

    def _request_frame(
        self,
        stream_id: int,
        service: str,
        method: str,
        request: Message,
        timeout: float,
        metadata: Mapping[str, str] | None,
        flags: int = Flags.NONE,
    ) -> bytes:
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=max(1, int(timeout * 1e9)),
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()],
        )
        return encode_frame(stream_id, MessageType.REQUEST, flags, envelope.SerializeToString())

    async def _send(self, frame: bytes, timeout: float | None = None) -> None:
        if self._closed is not None:
            raise self._closed_error()
        try:
            async with asyncio.timeout(timeout), self._write_lock:
                self._writer.write(frame)
                await self._writer.drain()
        except TimeoutError:
            message = f"{self.name} did not accept data within {timeout:g}s"
            raise RpcError(Code.DEADLINE_EXCEEDED, message) from None
        except (ConnectionError, OSError) as exc:
            raise ConnectionClosed(f"cannot write to {self.name}: {exc}") from None

    async def _read_loop(self) -> None:
        error: ProtocolError = ConnectionClosed(f"ttrpc connection to {self.name} closed")
        try:
            while True:
                frame = await read_frame(self._reader, self._frame_timeout)
                if frame is None:
                    error = ConnectionClosed(f"{self.name} closed the connection")
                    break
                await self._dispatch(frame)
                # frames already buffered are read without suspending: let the callers' timeouts
                # and other tasks run between them, however fast the peer floods
                await asyncio.sleep(0)
        except ProtocolError as exc:
            error = exc
            # every call on the connection fails with this error, which its caller reports:
            # a warning here would be a second, stray line on a user's terminal
            log.info("ttrpc connection to %s broken: %s", self.name, exc)
        except (ConnectionError, OSError) as exc:
            error = ConnectionClosed(f"connection to {self.name} lost: {exc}")
        finally:
            if self._closed is None:
                self._closed = error
            self._fail_all(self._closed)
            # Nothing more can be answered, and a broken peer gets no more of our bytes.
            self._writer.close()

    async def _dispatch(self, frame: Frame) -> None:
        if frame.type == MessageType.RESPONSE:
            # Decoded before the call is looked up: a broken envelope must fail that call too.
            response = _parse(ttrpc_pb2.Response, frame.data, "ttrpc response")
            future = self._pending.pop(frame.stream_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(response)
            elif (stream := self._streams.get(frame.stream_id)) is not None:
                await stream._deliver(frame)
            else:
                log.debug("dropping a response for unknown stream %d from %s", frame.stream_id, self.name)
        elif frame.type == MessageType.DATA:
            if frame.stream_id in self._pending:
                raise ProtocolError(f"{self.name} sent data on unary stream {frame.stream_id}")
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                await stream._deliver(frame)
            else:
                log.debug("dropping data for unknown stream %d from %s", frame.stream_id, self.name)
        elif frame.type == MessageType.REQUEST:
            raise ProtocolError(f"{self.name} sent a request; server-initiated streams are not supported")
        else:
            raise ProtocolError(f"{self.name} sent unknown ttrpc message type {frame.type}")

    def _fail_all(self, error: ProtocolError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for stream in self._streams.values():
            stream._fail(error)
        self._streams.clear()

    async def _close_writer(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()
