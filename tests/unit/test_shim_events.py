"""The shim's Publisher against a real kabuto.ttrpc server playing containerd's Events service."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_events_ttrpc_pb2 as forward_pb
from kabuto.shim import events
from kabuto.shim.events import Publisher
from kabuto.ttrpc import Code, RpcError, Server

BOUND = 10.0  # no test here waits longer than this for anything


class FakeContainerd:
    """containerd's ttrpc Events service on a Unix socket; records what Forward received."""

    def __init__(self, path: Path, refuse_first: int = 0) -> None:
        self.path = path
        self.received: list[forward_pb.Envelope] = []
        self.refused = 0
        self._refuse_first = refuse_first
        self._unix_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def forward(self, request: forward_pb.ForwardRequest) -> Empty:
        if self.refused < self._refuse_first:
            self.refused += 1
            raise RpcError(Code.UNAVAILABLE, "events exchange not ready")
        self.received.append(request.envelope)
        return Empty()

    async def start(self) -> None:
        server = Server()
        server.register(events.EVENTS_SERVICE, {"Forward": (forward_pb.ForwardRequest, self.forward)})

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await server.serve(reader, writer, name="shim")
            finally:
                self._connections.discard(task)

        self._unix_server = await asyncio.start_unix_server(on_connection, str(self.path))

    async def stop(self) -> None:
        """Go away as a restarting containerd does: listener and connections closed."""
        assert self._unix_server is not None
        self._unix_server.close()
        await self._unix_server.wait_closed()
        for task in list(self._connections):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.path.unlink(missing_ok=True)

    def topics(self) -> list[str]:
        return [envelope.topic for envelope in self.received]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths hold at most 107 bytes: pytest's tmp_path can be too deep
    directory = Path(tempfile.mkdtemp(prefix="kbe-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def publisher(address: str, namespace: str = "k8s.io") -> AsyncIterator[Publisher]:
    publisher = Publisher(address, namespace)
    try:
        yield publisher
    finally:
        await asyncio.wait_for(publisher.close(), BOUND)


def lifecycle(container_id: str) -> list[events_pb.TaskCreate | events_pb.TaskStart | events_pb.TaskExit
                                        | events_pb.TaskDelete]:
    exited_at = Timestamp(seconds=1_700_000_000)
    return [events_pb.TaskCreate(container_id=container_id, bundle=f"/b/{container_id}", pid=10),
            events_pb.TaskStart(container_id=container_id, pid=10),
            events_pb.TaskExit(container_id=container_id, id=container_id, pid=10, exit_status=3,
                               exited_at=exited_at),
            events_pb.TaskDelete(container_id=container_id, pid=10, exit_status=3, exited_at=exited_at)]


async def test_events_arrive_in_order_with_namespace_and_topic(socket_dir: Path) -> None:
    containerd = FakeContainerd(socket_dir / "ttrpc.sock")
    await containerd.start()
    try:
        async with publisher(f"unix://{socket_dir / 'ttrpc.sock'}") as shim_events:
            sent = lifecycle("c1") + lifecycle("c2")
            for event in sent:
                shim_events.publish(event)
            await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
    finally:
        await containerd.stop()
    assert containerd.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"] * 2
    assert {envelope.namespace for envelope in containerd.received} == {"k8s.io"}
    for envelope, event in zip(containerd.received, sent, strict=True):
        assert envelope.event.type_url == event.DESCRIPTOR.full_name
        decoded = type(event)()
        decoded.ParseFromString(envelope.event.value)
        assert decoded == event


async def test_containerd_that_comes_up_late_still_gets_the_event(socket_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL", 0.05)
    path = socket_dir / "ttrpc.sock"
    containerd = FakeContainerd(path)
    async with publisher(str(path)) as shim_events:
        shim_events.publish(events_pb.TaskExit(container_id="c1", id="c1", exit_status=7))
        await asyncio.sleep(0.3)  # several connection attempts fail meanwhile
        assert not containerd.received
        await containerd.start()
        try:
            await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
        finally:
            await containerd.stop()
    assert containerd.topics() == ["/tasks/exit"]


async def test_refused_forward_is_retried_once_delivered(socket_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL", 0.05)
    containerd = FakeContainerd(socket_dir / "ttrpc.sock", refuse_first=2)
    await containerd.start()
    try:
        async with publisher(str(containerd.path)) as shim_events:
            for event in lifecycle("c1"):
                shim_events.publish(event)
            await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
    finally:
        await containerd.stop()
    assert containerd.refused == 2
    assert containerd.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


async def test_restarted_containerd_gets_later_events(socket_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL", 0.05)
    path = socket_dir / "ttrpc.sock"
    first, second = FakeContainerd(path), FakeContainerd(path)
    async with publisher(str(path)) as shim_events:
        await first.start()
        shim_events.publish(events_pb.TaskStart(container_id="c1"))
        await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
        await first.stop()
        await second.start()
        try:
            shim_events.publish(events_pb.TaskExit(container_id="c1", id="c1"))
            await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
        finally:
            await second.stop()
    assert (first.topics(), second.topics()) == (["/tasks/start"], ["/tasks/exit"])


async def test_flush_is_bounded_while_containerd_is_away(socket_dir: Path) -> None:
    async with publisher(str(socket_dir / "nobody.sock")) as shim_events:
        shim_events.publish(events_pb.TaskPaused(container_id="c1"))
        # returns after its own timeout although the event cannot go out
        await asyncio.wait_for(shim_events.flush(0.2), BOUND)


async def test_undeliverable_event_is_dropped_and_the_queue_moves_on(socket_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL", 0.05)
    monkeypatch.setattr(events, "RETRY_FOR", 0.3)
    path = socket_dir / "ttrpc.sock"
    containerd = FakeContainerd(path)
    async with publisher(str(path)) as shim_events:
        shim_events.publish(events_pb.TaskPaused(container_id="c1"))
        await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)  # given up on
        await containerd.start()
        try:
            shim_events.publish(events_pb.TaskResumed(container_id="c1"))
            await asyncio.wait_for(shim_events.flush(BOUND), BOUND + 1)
        finally:
            await containerd.stop()
    assert containerd.topics() == ["/tasks/resumed"]

