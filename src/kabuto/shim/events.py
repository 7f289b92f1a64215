"""Task events back to containerd: Events.Forward on containerd's ttrpc address ($TTRPC_ADDRESS).

Events go out in order from one queue. containerd may be restarting: a failed forward reconnects
and retries for a bounded time, then the event is dropped with a log line (containerd asks the
shim for the state of its tasks when it comes back, so nothing is lost for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from kabuto.errors import KabutoError
from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_events_ttrpc_pb2 as forward_pb
from kabuto.ttrpc import Client

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT = 5.0
RETRY_FOR = 30.0
RETRY_INTERVAL = 0.5
QUEUE_LIMIT = 1024

TOPICS: dict[type[Message], str] = {
    events_pb.TaskCreate: "/tasks/create",
    events_pb.TaskStart: "/tasks/start",
    events_pb.TaskExit: "/tasks/exit",
    events_pb.TaskDelete: "/tasks/delete",
    events_pb.TaskExecAdded: "/tasks/exec-added",
    events_pb.TaskExecStarted: "/tasks/exec-started",
    events_pb.TaskPaused: "/tasks/paused",
    events_pb.TaskResumed: "/tasks/resumed",
    events_pb.TaskOOM: "/tasks/oom",
}


def envelope(namespace: str, event: Message) -> forward_pb.Envelope:
    timestamp = Timestamp()
    timestamp.GetCurrentTime()
    # containerd's typeurl names events by their proto full name, without a type.googleapis.com/ prefix
    packed = AnyMessage(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
    return forward_pb.Envelope(timestamp=timestamp, namespace=namespace, topic=TOPICS[type(event)],
                               event=packed)


class Publisher:
    """Forwards events to containerd; ``publish`` never blocks the caller."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[forward_pb.Envelope] = asyncio.Queue(QUEUE_LIMIT)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        if not self.address:
            return
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shim-events")
        try:
            self._queue.put_nowait(envelope(self.namespace, event))
        except asyncio.QueueFull:
            log.warning("event queue full: dropping %s", TOPICS[type(event)])

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until queued events went out: before the shim exits."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # a caller's cancel propagates
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._forward(item)
            finally:
                self._queue.task_done()

    async def _forward(self, item: forward_pb.Envelope) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR
        while True:
            try:
                client = await self._connect()
                await client.call(EVENTS_SERVICE, "Forward", forward_pb.ForwardRequest(envelope=item),
                                  Empty, timeout=FORWARD_TIMEOUT)
                return
            except (KabutoError, OSError) as exc:
                await self._disconnect()
                if loop.time() >= give_up:
                    log.warning("dropping event %s: containerd at %s: %s", item.topic, self.address, exc)
                    return
                await asyncio.sleep(RETRY_INTERVAL)

    async def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            async with asyncio.timeout(FORWARD_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self.address)
            self._client = Client(reader, writer, name=f"containerd events at {self.address}")
        return self._client

    async def _disconnect(self) -> None:
        if self._client is not None:
            with contextlib.suppress(KabutoError, OSError):
                await self._client.close()
        self._client = None
