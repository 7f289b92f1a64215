"""ttrpc server: services registered by name, each connection served until it ends.

Handlers are coroutines. A unary handler takes the decoded request and returns the
response message; a streaming handler also gets a ServerStream to exchange data
messages. Unknown services and methods answer UNIMPLEMENTED (as containerd/ttrpc does,
so containerd's clients recognise it), undecodable requests INVALID_ARGUMENT, a handler's
RpcError its own status, any other exception UNKNOWN with its message, an expired
request deadline DEADLINE_EXCEEDED. A peer breaking the framing gets its connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from kabuto.errors import ProtocolError
from kabuto.protos import ttrpc_pb2
from kabuto.ttrpc.framing import (
    DEFAULT_FRAME_TIMEOUT,
    MAX_DATA_LENGTH,
    Flags,
    Frame,
    MessageType,
    encode_frame,
    read_frame,
)
from kabuto.ttrpc.status import Code, ConnectionClosed, RpcError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

DEFAULT_MAX_CONCURRENT_CALLS = 128
# A peer that stops reading our answers for this long is treated as gone.
DEFAULT_WRITE_TIMEOUT = 30.0
STREAM_QUEUE_FRAMES = 64
CANCEL_TIMEOUT = 2.0

UnaryHandler = Callable[[Any], Awaitable[Message]]
StreamHandler = Callable[[Any, "ServerStream"], Awaitable[Message | None]]


@dataclass(frozen=True)
class Method:
    request_type: type[Message]
    handler: Callable[..., Awaitable[Message | None]]
    streaming: bool = False


def unary_method(request_type: type[Message], handler: UnaryHandler) -> Method:
    return Method(request_type, handler)


def stream_method(request_type: type[Message], handler: StreamHandler) -> Method:
    """The handler gets (request, stream); what it returns ends the stream as the response."""
    return Method(request_type, handler, streaming=True)


Methods = Mapping[str, Method | tuple[type[Message], UnaryHandler]]


def _normalize(methods: Methods) -> dict[str, Method]:
    return {name: m if isinstance(m, Method) else unary_method(*m) for name, m in methods.items()}


@dataclass(frozen=True)
class CallContext:
    service: str
    method: str
    stream_id: int
    metadata: Mapping[str, tuple[str, ...]]
    deadline: float | None  # loop.time() by which the caller gives up; None: no deadline


current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("ttrpc_current_call")


class ServerStream:
    """The server's side of a streaming call."""

    def __init__(self, connection: _Connection, stream_id: int, *, remote_closed: bool) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._incoming: asyncio.Queue[Frame | None] = asyncio.Queue(STREAM_QUEUE_FRAMES)
        self._remote_closed = remote_closed
        if remote_closed:
            self._incoming.put_nowait(None)

    async def send(self, message: Message) -> None:
        await self._connection.send(
            encode_frame(self.stream_id, MessageType.DATA, Flags.NONE, message.SerializeToString())
        )

    async def recv(self, message_type: type[M]) -> M | None:
        """The client's next data message; None once it has closed its side."""
        while True:
            frame = await self._incoming.get()
            if frame is None:
                self._incoming.put_nowait(None)  # stays ended for later calls
                return None
            if frame.flags & Flags.REMOTE_CLOSED:
                self._incoming.put_nowait(None)
            if frame.flags & Flags.NO_DATA:
                continue
            message = message_type()
            try:
                message.ParseFromString(frame.data)
            except (DecodeError, ValueError, RecursionError) as exc:
                raise RpcError(Code.INVALID_ARGUMENT, f"undecodable stream data: {exc}") from None
            return message

    async def _deliver(self, frame: Frame) -> None:
        if self._remote_closed:
            raise ProtocolError(f"data on stream {self.stream_id} after the client closed it")
        if frame.flags & Flags.REMOTE_CLOSED:
            self._remote_closed = True
        await self._incoming.put(frame)


@dataclass
class Server:
    """Registry of services; ``serve`` runs one connection (any asyncio stream pair)."""

    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    services: dict[str, dict[str, Method]] = field(default_factory=dict)
    loading: dict[str, asyncio.Future[Methods]] = field(default_factory=dict)

    def register(self, service: str, methods: Methods) -> None:
        """Add a service: method name -> Method, or (request class, async handler) for unary."""
        if service in self.services or service in self.loading:
            raise ValueError(f"ttrpc service {service!r} is already registered")
        self.services[service] = _normalize(methods)

    def register_loading(self, service: str, methods: Awaitable[Methods]) -> None:
        """Add a service whose methods are still loading (a slow import, say), so that what
        is ready can serve meanwhile. Its calls wait for the methods within their deadline
        (then DEADLINE_EXCEEDED); if loading fails they get UNAVAILABLE with the reason."""
        if service in self.services or service in self.loading:
            raise ValueError(f"ttrpc service {service!r} is already registered")
        future = asyncio.ensure_future(methods)
        future.add_done_callback(lambda f: self._loaded(service, f))
        self.loading[service] = future

    def _loaded(self, service: str, future: asyncio.Future[Methods]) -> None:
        if future.cancelled():
            return
        if (error := future.exception()) is not None:
            log.error("ttrpc service %s failed to load: %s", service, error)
        else:
            self.services[service] = _normalize(future.result())

    async def service(self, name: str, deadline: float | None) -> dict[str, Method] | None:
        """The methods of a service, waiting (until ``deadline``) for one still loading."""
        loading = self.loading.get(name)
        if loading is not None and not loading.done():
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(loading)
            except TimeoutError:
                raise RpcError(Code.DEADLINE_EXCEEDED, f"service {name!r} is still loading") from None
            except Exception:
                pass  # reported below, like for every later call
        if loading is not None and not loading.cancelled() and (error := loading.exception()) is not None:
            raise RpcError(Code.UNAVAILABLE, f"service {name!r} failed to load: {error}")
        return self.services.get(name)

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str = "",
        peer_may_restart: bool = False,
    ) -> None:
        """Serve until the peer closes or breaks the protocol; then close ``writer``.

        Returns normally in both cases (the reason is logged); calls still running are
        cancelled. ``peer_may_restart``: the byte stream may pass to a new client without
        an EOF in between (a virtio-serial port whose host reconnected quickly), so a
        request whose stream id does not exceed the last one starts afresh (running calls
        are cancelled) instead of being a protocol error.
        """
        connection = _Connection(self, reader, writer, name or "ttrpc client", peer_may_restart)
        await connection.run()


class _Connection:
    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
        peer_may_restart: bool,
    ) -> None:
        self.server = server
        self.peer_may_restart = peer_may_restart
        self.last_stream_id = 0
        self.reader = reader
        self.writer = writer
        self.name = name
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, ServerStream] = {}
        self.write_lock = asyncio.Lock()
        self.call_finished = asyncio.Event()
        self.broken = False

    async def run(self) -> None:
        try:
            while True:
                frame = await read_frame(self.reader, self.server.frame_timeout)
                if frame is None:
                    log.debug("%s closed the connection", self.name)
                    break
                await self.dispatch(frame)
        except ProtocolError as exc:
            log.warning("closing the connection to %s: %s", self.name, exc)
        except (ConnectionError, OSError) as exc:
            log.info("connection to %s lost: %s", self.name, exc)
        finally:
            self.broken = True
            await self.cancel_calls()
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CANCEL_TIMEOUT):
                    await self.writer.wait_closed()

    async def dispatch(self, frame: Frame) -> None:
        if frame.type == MessageType.REQUEST:
            await self.start_call(frame)
        elif frame.type == MessageType.DATA:
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                await stream._deliver(frame)
            elif frame.stream_id in self.calls:
                raise ProtocolError(f"data on unary stream {frame.stream_id}")
            else:
                log.debug("dropping data for unknown stream %d from %s", frame.stream_id, self.name)
        elif frame.type == MessageType.RESPONSE:
            raise ProtocolError("a client sent a response; server-initiated streams are not supported")
        else:
            raise ProtocolError(f"unknown ttrpc message type {frame.type}")

    async def start_call(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 0:
            raise ProtocolError(f"request on even stream id {stream_id}; client streams are odd")
        if self.peer_may_restart and stream_id <= self.last_stream_id:
            log.info("stream ids restarted at %d on %s: serving a new client", stream_id, self.name)
            await self.cancel_calls()
            self.streams.clear()
        self.last_stream_id = stream_id
        if stream_id in self.calls:
            raise ProtocolError(f"request on stream {stream_id}, which is still in use")
        if len(self.calls) >= self.server.max_concurrent_calls:
            # Stop reading until a call finishes: a flooding peer waits instead of piling up tasks.
            self.call_finished.clear()
            while len(self.calls) >= self.server.max_concurrent_calls:
                await self.call_finished.wait()
                self.call_finished.clear()
        if frame.flags & (Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED):
            # Non-unary: its data frames may arrive before the handler starts.
            remote_closed = not frame.flags & Flags.REMOTE_OPEN
            self.streams[stream_id] = ServerStream(self, stream_id, remote_closed=remote_closed)
        task = asyncio.create_task(self.answer(frame), name=f"ttrpc-call {self.name} #{stream_id}")
        self.calls[stream_id] = task
        task.add_done_callback(lambda _t: self.finish_call(stream_id))

    def finish_call(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        self.streams.pop(stream_id, None)
        self.call_finished.set()

    async def answer(self, frame: Frame) -> None:
        response = ttrpc_pb2.Response()
        try:
            payload = await self.handle(frame)
            response.payload = payload
        except RpcError as exc:
            response.status.CopyFrom(exc.to_status())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("ttrpc handler for stream %d failed", frame.stream_id)
            message = str(exc) or type(exc).__name__
            response.status.CopyFrom(ttrpc_pb2.Status(code=Code.UNKNOWN, message=message))
        data = response.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            status = ttrpc_pb2.Status(
                code=Code.RESOURCE_EXHAUSTED, message=f"response of {len(data)} bytes exceeds the ttrpc limit"
            )
            data = ttrpc_pb2.Response(status=status).SerializeToString()
        with contextlib.suppress(ConnectionClosed):
            await self.send(encode_frame(frame.stream_id, MessageType.RESPONSE, Flags.NONE, data))

    async def handle(self, frame: Frame) -> bytes:
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(frame.data)
        except (DecodeError, ValueError, RecursionError) as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"undecodable ttrpc request: {exc}") from None
        where = f"{request.service}/{request.method}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        service = await self.server.service(request.service, deadline)
        if service is None:
            raise RpcError(Code.UNIMPLEMENTED, f"service {request.service!r} is not served here")
        method = service.get(request.method)
        if method is None:
            raise RpcError(Code.UNIMPLEMENTED, f"method {where!r} is not served here")
        message = method.request_type()
        try:
            message.ParseFromString(request.payload)
        except (DecodeError, ValueError, RecursionError) as exc:
            raise RpcError(Code.INVALID_ARGUMENT, f"{where}: undecodable request: {exc}") from None

        metadata: dict[str, tuple[str, ...]] = {}
        for pair in request.metadata:
            metadata[pair.key] = (*metadata.get(pair.key, ()), pair.value)
        current_call.set(CallContext(request.service, request.method, frame.stream_id, metadata, deadline))

        if method.streaming:
            stream = self.streams.get(frame.stream_id)
            if stream is None:  # a unary request to a streaming method: the client sends nothing more
                stream = self.streams[frame.stream_id] = ServerStream(
                    self, frame.stream_id, remote_closed=True
                )
            invocation = method.handler(message, stream)
        else:
            self.streams.pop(frame.stream_id, None)  # later data on it breaks the protocol
            invocation = method.handler(message)
        try:
            async with asyncio.timeout_at(deadline):
                result = await invocation
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise RpcError(Code.DEADLINE_EXCEEDED, f"{where} missed its deadline") from None
            raise
        return result.SerializeToString() if result is not None else b""

    async def send(self, frame: bytes) -> None:
        if self.broken:
            raise ConnectionClosed(f"connection to {self.name} is closed")
        try:
            async with asyncio.timeout(self.server.write_timeout), self.write_lock:
                self.writer.write(frame)
                await self.writer.drain()
        except TimeoutError:
            self.broken = True
            self.writer.close()
            raise ConnectionClosed(
                f"{self.name} did not read our data for {self.server.write_timeout:g}s"
            ) from None
        except (ConnectionError, OSError) as exc:
            self.broken = True
            raise ConnectionClosed(f"cannot write to {self.name}: {exc}") from None

    async def cancel_calls(self) -> None:
        tasks = list(self.calls.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_TIMEOUT)
