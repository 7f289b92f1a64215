"""The shim's containerd.task.v2.Task service, called through a real ttrpc connection as
containerd calls it, running tasks in the fake VMM and fake guest of test_runtime_fake_vmm
(real processes, real bind mounts, real FIFOs; only the guest is simulated)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
import test_runtime_fake_vmm as fake_vm
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from kabuto.agent.containers import ContainerStats
from kabuto.errors import KabutoError
from kabuto.protos import containerd_cgroups_v2_pb2 as cgroups_pb
from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_runtimeoptions_pb2 as options_pb
from kabuto.protos import containerd_shim_pb2 as pb
from kabuto.protos import containerd_task_types_pb2 as task_types_pb
from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION
from kabuto.runtime.state import StateStore
from kabuto.shim.service import TASK_SERVICE, TaskService
from kabuto.ttrpc import Client, Code, RpcError, Server

# the fake VMM and guest for every test here; `store` fails a test that leaves anything behind
fakes = fake_vm.fakes
store = fake_vm.store

BOUND = 10.0
M = TypeVar("M", bound=Message)


class RecordingPublisher:
    """Stands in for the events Publisher: what the service told containerd, in order."""

    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [type(event).__name__ for event in self.events]


@dataclass
class Shim:
    client: Client
    service: TaskService
    publisher: RecordingPublisher
    config: Path
    idle: list[bool] = field(default_factory=list)

    async def call(self, method: str, request: Message, response_type: type[M] = Empty) -> M:  # type: ignore[assignment]
        return await self.client.call(TASK_SERVICE, method, request, response_type, timeout=BOUND)

    def options(self) -> AnyMessage:
        # what CRI passes for a runtime with `ConfigPath` in its options
        return AnyMessage(type_url="runtimeoptions.v1.Options",
                          value=options_pb.Options(config_path=str(self.config)).SerializeToString())

    async def create(self, task_id: str, bundle: Path, **stdio: Any) -> pb.CreateTaskResponse:
        request = pb.CreateTaskRequest(id=task_id, bundle=str(bundle), options=self.options(), **stdio)
        return await self.call("Create", request, pb.CreateTaskResponse)


@pytest.fixture
async def shim(store: StateStore, tmp_path: Path) -> AsyncIterator[Shim]:
    config = tmp_path / "kabuto.toml"
    config.write_text('[runtime]\nhypervisor_name = "fakevmm"\n')
    publisher = RecordingPublisher()
    idle: list[bool] = []
    service = TaskService(store, publisher, on_idle=lambda: idle.append(True))  # type: ignore[arg-type]
    server = Server()
    server.register(TASK_SERVICE, service.methods())
    containerd_end, shim_end = socket.socketpair()
    serving = asyncio.create_task(server.serve(*await asyncio.open_connection(sock=shim_end)))
    client = Client(*await asyncio.open_connection(sock=containerd_end), name="shim")
    try:
        yield Shim(client, service, publisher, config, idle)
    finally:
        await client.close()
        await asyncio.wait_for(serving, BOUND)
        await asyncio.wait_for(service.close(), BOUND)


async def rpc_error(call: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    return caught.value


def fifo(directory: Path, name: str) -> Path:
    path = directory / name
    os.mkfifo(path)
    return path


class FifoReader:
    """containerd's side of an output FIFO: opened at once (as containerd does before its
    request; the shim holds the other end), read by a thread until end of file."""

    def __init__(self, path: Path) -> None:
        self.data = bytearray()
        reader = FileIO(path, "rb")  # the thread closes it
        self._thread = threading.Thread(target=self._read, args=(reader,))
        self._thread.start()

    def _read(self, reader: FileIO) -> None:
        with reader:
            while chunk := reader.read(65536):
                self.data.extend(chunk)

    def join(self) -> bytes:
        self._thread.join(BOUND)
        assert not self._thread.is_alive()
        return bytes(self.data)


def state_root_entries(store: StateStore) -> list[str]:
    if not store.root.exists():
        return []
    return sorted(p.name for p in store.root.iterdir() if p.name not in (".lock", ".vm"))


# -- unknown ids and refused requests -------------------------------------------------------
UNKNOWN_TASK_CALLS: list[tuple[str, Callable[[], Message], type[Message]]] = [
    ("State", lambda: pb.StateRequest(id="ghost"), pb.StateResponse),
    ("Start", lambda: pb.StartRequest(id="ghost"), pb.StartResponse),
    ("Kill", lambda: pb.KillRequest(id="ghost", signal=9), Empty),
    ("Wait", lambda: pb.WaitRequest(id="ghost"), pb.WaitResponse),
    ("Delete", lambda: pb.DeleteRequest(id="ghost"), pb.DeleteResponse),
    ("Exec", lambda: pb.ExecProcessRequest(id="ghost", exec_id="e1",
                                           spec=AnyMessage(value=b'{"args": ["true"]}')), Empty),
    ("Pids", lambda: pb.PidsRequest(id="ghost"), pb.PidsResponse),
    ("Pause", lambda: pb.PauseRequest(id="ghost"), Empty),
    ("Resume", lambda: pb.ResumeRequest(id="ghost"), Empty),
    ("CloseIO", lambda: pb.CloseIORequest(id="ghost", stdin=True), Empty),
    ("ResizePty", lambda: pb.ResizePtyRequest(id="ghost", width=80, height=24), Empty),
    ("Update", lambda: pb.UpdateTaskRequest(id="ghost"), Empty),
    ("Stats", lambda: pb.StatsRequest(id="ghost"), pb.StatsResponse),
]


@pytest.mark.parametrize(("method", "request_factory", "response_type"), UNKNOWN_TASK_CALLS,
                         ids=[call[0] for call in UNKNOWN_TASK_CALLS])
async def test_unknown_task_is_not_found_by_name(shim: Shim, method: str,
                                                 request_factory: Callable[[], Message],
                                                 response_type: type[Message]) -> None:
    error = await rpc_error(shim.call(method, request_factory(), response_type))
    assert error.code == Code.NOT_FOUND
    assert "ghost" in error.message


async def test_checkpoint_is_unimplemented(shim: Shim) -> None:
    error = await rpc_error(shim.call("Checkpoint", pb.CheckpointTaskRequest(id="c1", path="/cp")))
    assert error.code == Code.UNIMPLEMENTED


async def test_shutdown_without_tasks_lets_the_shim_go(shim: Shim) -> None:
    await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))
    assert shim.idle == [True]


@pytest.mark.parametrize("breakage", ["no config.json", "no rootfs", "config.json not JSON"])
async def test_create_with_a_bad_bundle_is_invalid_and_starts_nothing(shim: Shim, store: StateStore,
                                                                      tmp_path: Path, breakage: str) -> None:
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["echo", "hi"])
    if breakage == "no config.json":
        (bundle / "config.json").unlink()
    elif breakage == "no rootfs":
        for child in (bundle / "rootfs").iterdir():
            child.unlink()
        (bundle / "rootfs").rmdir()
    else:
        (bundle / "config.json").write_text("{not json")
    stdout = fifo(tmp_path, "stdout")
    error = await rpc_error(shim.create("c1", bundle, stdout=str(stdout)))
    assert error.code == Code.INVALID_ARGUMENT
    assert str(bundle) in error.message
    assert not fake_vm.GUESTS, "a VM was started"
    assert state_root_entries(store) == []
    assert shim.publisher.events == []
    # the id stays free
    error = await rpc_error(shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse))
    assert error.code == Code.NOT_FOUND


async def test_create_with_a_bad_stdio_path_is_invalid_and_starts_nothing(shim: Shim, store: StateStore,
                                                                          tmp_path: Path) -> None:
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["echo", "hi"])
    error = await rpc_error(shim.create("c1", bundle, stdout=str(tmp_path / "no-such-fifo")))
    assert error.code == Code.INVALID_ARGUMENT and "no-such-fifo" in error.message
    assert not fake_vm.GUESTS and state_root_entries(store) == []


async def test_create_with_an_unusable_config_is_invalid_and_leaves_nothing(shim: Shim, store: StateStore,
                                                                            tmp_path: Path) -> None:
    shim.config.write_text('[runtime]\nhypervisor_name = "no-such-vmm"\n')
    error = await rpc_error(shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["echo"])))
    assert error.code == Code.INVALID_ARGUMENT and "no-such-vmm" in error.message
    assert not fake_vm.GUESTS and state_root_entries(store) == []
    # a shim left holding nothing goes (containerd's Delete and Shutdown would say the same)
    assert shim.idle == [True]


async def test_create_with_undecodable_runtime_options_is_invalid(shim: Shim, store: StateStore,
                                                                  tmp_path: Path) -> None:
    garbage = AnyMessage(type_url="runtimeoptions.v1.Options", value=b"\xff\xff")
    request = pb.CreateTaskRequest(id="c1", bundle=str(fake_vm.make_bundle(tmp_path / "bundle", ["echo"])),
                                   options=garbage)
    error = await rpc_error(shim.call("Create", request, pb.CreateTaskResponse))
    assert error.code == Code.INVALID_ARGUMENT
    assert not fake_vm.GUESTS and state_root_entries(store) == []


async def test_pod_container_without_its_sandbox_is_refused(shim: Shim, store: StateStore,
                                                             tmp_path: Path) -> None:
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["echo"], **{CONTAINER_TYPE_ANNOTATION: "container",
                                                                   SANDBOX_ID_ANNOTATION: "pod-1"})
    error = await rpc_error(shim.create("app", bundle))
    assert error.code == Code.FAILED_PRECONDITION and "pod-1" in error.message
    assert not fake_vm.GUESTS and state_root_entries(store) == []


async def test_invalid_task_id_is_refused(shim: Shim, tmp_path: Path) -> None:
    error = await rpc_error(shim.create("../escape", fake_vm.make_bundle(tmp_path / "bundle", ["echo"])))
    assert error.code == Code.INVALID_ARGUMENT and "../escape" in error.message


# -- lifecycles -----------------------------------------------------------------------------
async def test_create_start_wait_delete_with_output_through_a_fifo(shim: Shim, store: StateStore,
                                                                  tmp_path: Path) -> None:
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["echo", "hello", "from", "the", "guest"])
    stdout = fifo(tmp_path, "stdout")
    created = await shim.create("c1", bundle, stdout=str(stdout))
    reader = FifoReader(stdout)
    assert created.pid > 0  # the VMM's, as in Kata
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert (state.id, state.status, state.bundle, state.stdout) == ("c1", task_types_pb.CREATED, str(bundle),
                                                                    str(stdout))
    started = await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    assert started.pid == created.pid
    waited = await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
    assert waited.exit_status == 0 and waited.exited_at.seconds > 0
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert (state.status, state.exit_status, state.exited_at) == (task_types_pb.STOPPED, 0, waited.exited_at)
    deleted = await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
    assert (deleted.exit_status, deleted.exited_at) == (0, waited.exited_at)
    assert reader.join() == b"hello from the guest\n"

    assert shim.publisher.kinds() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
    create, start, exit_, delete = shim.publisher.events
    assert isinstance(create, events_pb.TaskCreate) and isinstance(start, events_pb.TaskStart)
    assert isinstance(exit_, events_pb.TaskExit) and isinstance(delete, events_pb.TaskDelete)
    assert (create.container_id, create.bundle, create.pid) == ("c1", str(bundle), created.pid)
    assert create.io.stdout == str(stdout)
    assert (start.container_id, start.pid) == ("c1", created.pid)
    assert (exit_.container_id, exit_.id, exit_.exit_status) == ("c1", "c1", 0)
    assert exit_.exited_at == waited.exited_at
    assert (delete.container_id, delete.exit_status) == ("c1", 0)

    # the task and its VM are gone: the id is unknown, the state root empty, the shim goes; the
    # Shutdown containerd sends next is still answered
    error = await rpc_error(shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse))
    assert error.code == Code.NOT_FOUND
    assert state_root_entries(store) == [] and shim.service.sandbox is None
    assert shim.idle == [True]
    await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))


async def test_exit_status_and_a_running_task_refusing_delete(shim: Shim, tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    error = await rpc_error(shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse))
    assert error.code == Code.FAILED_PRECONDITION
    await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))
    assert shim.idle == []  # a task still runs: the shim stays
    waiting = asyncio.ensure_future(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse))
    await shim.call("Kill", pb.KillRequest(id="c1", signal=9))
    assert (await asyncio.wait_for(waiting, BOUND)).exit_status == 137
    error = await rpc_error(shim.call("Kill", pb.KillRequest(id="c1", signal=9)))
    assert error.code == Code.NOT_FOUND  # containerd's "process already finished"
    assert (await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)).exit_status == 137
    exit_event = shim.publisher.events[2]
    assert isinstance(exit_event, events_pb.TaskExit) and exit_event.exit_status == 137


async def test_an_oom_kill_in_the_guest_is_task_oom_before_task_exit(shim: Shim, tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["oom"]))
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    waited = await asyncio.wait_for(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse), BOUND)
    assert waited.exit_status == 137
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
    assert shim.publisher.kinds() == ["TaskCreate", "TaskStart", "TaskOOM", "TaskExit", "TaskDelete"]
    assert shim.publisher.events[2] == events_pb.TaskOOM(container_id="c1")


async def test_a_created_task_can_be_deleted_without_starting(shim: Shim, store: StateStore,
                                                               tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    assert shim.idle == []
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
    assert shim.publisher.kinds() == ["TaskCreate", "TaskDelete"]
    assert state_root_entries(store) == [] and shim.service.sandbox is None
    # the last task's Delete lets the shim go, Shutdown or not: a containerd that stopped between
    # the two, restarted, would find no task here to delete, so would never send it
    assert shim.idle == [True]


async def test_duplicate_create_is_already_exists(shim: Shim, tmp_path: Path) -> None:
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["sleep"])
    await shim.create("c1", bundle)
    error = await rpc_error(shim.create("c1", bundle))
    assert error.code == Code.ALREADY_EXISTS and "c1" in error.message
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_stdin_reaches_the_task_until_containerd_closes_it(shim: Shim, tmp_path: Path) -> None:
    stdin, stdout = fifo(tmp_path, "stdin"), fifo(tmp_path, "stdout")
    # containerd opens its end of stdin before Create (its fifo package waits for the reader)
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(stdin, os.O_WRONLY)))
    opener.start()
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["cat"]), stdin=str(stdin),
                      stdout=str(stdout))
    opener.join(BOUND)
    reader = FifoReader(stdout)
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    os.write(opened[0], b"typed " * 1000)
    os.close(opened[0])  # cat's stdin ends: it echoes everything and exits
    waited = await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
    assert waited.exit_status == 0
    assert reader.join() == b"typed " * 1000
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_close_io_hands_over_what_was_written_then_ends_stdin(shim: Shim, tmp_path: Path) -> None:
    stdin, stdout = fifo(tmp_path, "stdin"), fifo(tmp_path, "stdout")
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["cat"]), stdin=str(stdin),
                      stdout=str(stdout))
    writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    reader = FifoReader(stdout)
    os.write(writer, b"last words\n")
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    await shim.call("CloseIO", pb.CloseIORequest(id="c1", stdin=True))
    waited = await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
    os.close(writer)
    assert waited.exit_status == 0 and reader.join() == b"last words\n"
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_close_io_after_an_exec_with_stdin_exited_is_answered(shim: Shim, tmp_path: Path) -> None:
    """CRI closes an exec's stdin once the exec exited (its stdin pump is cancelled by then)."""
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    stdin = fifo(tmp_path, "exec-stdin")
    writer = os.open(stdin, os.O_RDWR)  # containerd keeps its end open until CloseIO
    try:
        await shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id="e1", stdin=str(stdin),
                                                      spec=AnyMessage(value=b'{"args": ["exit", "7"]}')))
        await shim.call("Start", pb.StartRequest(id="c1", exec_id="e1"), pb.StartResponse)
        waited = await shim.call("Wait", pb.WaitRequest(id="c1", exec_id="e1"), pb.WaitResponse)
        assert waited.exit_status == 7
        await shim.call("CloseIO", pb.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    finally:
        os.close(writer)
    await shim.call("Delete", pb.DeleteRequest(id="c1", exec_id="e1"), pb.DeleteResponse)
    await shim.call("Kill", pb.KillRequest(id="c1", signal=9))
    await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_exec_lifecycle_and_bad_exec_specs(shim: Shim, tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    error = await rpc_error(shim.call("Exec", pb.ExecProcessRequest(
        id="c1", exec_id="e0", spec=AnyMessage(value=b'{"args": ["true"]}'))))
    assert error.code == Code.FAILED_PRECONDITION  # the task was not started
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    for spec in (b"not json", b'{"args": []}', b'{"cwd": "/"}', b'["echo"]', b'{"args": "echo"}'):
        error = await rpc_error(shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id="bad",
                                                                        spec=AnyMessage(value=spec))))
        assert error.code == Code.INVALID_ARGUMENT, spec
    error = await rpc_error(shim.call("State", pb.StateRequest(id="c1", exec_id="bad"), pb.StateResponse))
    assert error.code == Code.NOT_FOUND and "bad" in error.message

    stdout = fifo(tmp_path, "exec-stdout")
    spec = json.dumps({"args": ["echo", "from", "exec"], "cwd": "/"}).encode()
    await shim.call("Exec", pb.ExecProcessRequest(
        id="c1", exec_id="e1", stdout=str(stdout),
        spec=AnyMessage(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=spec)))
    error = await rpc_error(shim.call("Exec", pb.ExecProcessRequest(id="c1", exec_id="e1",
                                                                    spec=AnyMessage(value=spec))))
    assert error.code == Code.ALREADY_EXISTS
    reader = FifoReader(stdout)
    await shim.call("Start", pb.StartRequest(id="c1", exec_id="e1"), pb.StartResponse)
    waited = await shim.call("Wait", pb.WaitRequest(id="c1", exec_id="e1"), pb.WaitResponse)
    assert waited.exit_status == 0
    assert reader.join() == b"from exec\n"
    state = await shim.call("State", pb.StateRequest(id="c1", exec_id="e1"), pb.StateResponse)
    assert (state.exec_id, state.status) == ("e1", task_types_pb.STOPPED)
    await shim.call("Delete", pb.DeleteRequest(id="c1", exec_id="e1"), pb.DeleteResponse)
    error = await rpc_error(shim.call("Wait", pb.WaitRequest(id="c1", exec_id="e1"), pb.WaitResponse))
    assert error.code == Code.NOT_FOUND

    exec_events = [e for e in shim.publisher.events if getattr(e, "exec_id", "") == "e1"
                   or getattr(e, "id", "") == "e1"]
    assert [type(e).__name__ for e in exec_events] == ["TaskExecAdded", "TaskExecStarted", "TaskExit",
                                                       "TaskDelete"]
    # the init task still runs in the VM
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert state.status == task_types_pb.RUNNING
    pids = await shim.call("Pids", pb.PidsRequest(id="c1"), pb.PidsResponse)
    assert [p.pid for p in pids.processes] == [1]
    await shim.call("Kill", pb.KillRequest(id="c1", signal=9))
    await shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_pod_containers_join_the_sandbox_vm(shim: Shim, store: StateStore, tmp_path: Path) -> None:
    pod = await shim.create("pod", fake_vm.make_bundle(tmp_path / "pod", ["sleep"]))
    await shim.call("Start", pb.StartRequest(id="pod"), pb.StartResponse)
    member = {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: "pod"}
    app = await shim.create("app", fake_vm.make_bundle(tmp_path / "app", ["echo", "hi"], **member))
    assert app.pid == pod.pid  # one VM
    assert set(fake_vm.GUESTS) == {"pod"} and set(fake_vm.GUESTS["pod"].containers) == {"pod", "app"}
    await shim.call("Kill", pb.KillRequest(id="pod", signal=9))
    await shim.call("Wait", pb.WaitRequest(id="pod"), pb.WaitResponse)
    error = await rpc_error(shim.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse))
    assert error.code == Code.FAILED_PRECONDITION and "app" in error.message
    await shim.call("Start", pb.StartRequest(id="app"), pb.StartResponse)
    await shim.call("Wait", pb.WaitRequest(id="app"), pb.WaitResponse)
    await shim.call("Delete", pb.DeleteRequest(id="app"), pb.DeleteResponse)
    assert set(fake_vm.GUESTS["pod"].containers) == {"pod"} and shim.service.sandbox is not None
    # a member that fails to join, or leaves, leaves the pod's shim serving the pod
    broken = fake_vm.make_bundle(tmp_path / "broken", ["echo"], **member)
    (broken / "config.json").write_text("{not json")
    assert (await rpc_error(shim.create("broken", broken))).code == Code.INVALID_ARGUMENT
    assert shim.idle == []
    await shim.call("Delete", pb.DeleteRequest(id="pod"), pb.DeleteResponse)
    assert state_root_entries(store) == [] and shim.service.sandbox is None
    assert shim.idle == [True]


async def test_update_with_resources_that_are_not_a_json_object_is_invalid(shim: Shim,
                                                                            tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    for resources in (b"{broken", b"[1, 2]", b"\xff"):
        error = await rpc_error(shim.call("Update", pb.UpdateTaskRequest(id="c1",
                                                                          resources=AnyMessage(value=resources))))
        assert error.code == Code.INVALID_ARGUMENT, resources
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def a_create_still_booting(shim: Shim, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> asyncio.Future[Any]:
    """Task c1's Create, started and waiting for a guest agent that never answers (its VMM runs)."""
    booting = asyncio.Event()

    async def agent_that_never_answers(address: str, timeout: float, **kwargs: Any) -> None:
        booting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(fake_vm.sandbox_module, "wait_for_agent", agent_that_never_answers)
    creating = asyncio.ensure_future(shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"])))
    await asyncio.wait_for(booting.wait(), BOUND)
    return creating


@pytest.mark.parametrize("gives_up_with", ["Delete", "Shutdown"])
async def test_containerd_giving_up_on_a_booting_create_leaves_nothing(
        shim: Shim, store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        gives_up_with: str) -> None:
    creating = await a_create_still_booting(shim, tmp_path, monkeypatch)
    assert "c1" in fake_vm.GUESTS  # the VMM runs
    if gives_up_with == "Delete":
        error = await rpc_error(shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse))
        assert error.code == Code.NOT_FOUND
    else:
        await shim.call("Shutdown", pb.ShutdownRequest(id="c1"))
    assert shim.idle  # either way the shim goes (after a Delete, without waiting for Shutdown)
    # the abandoned Create is undone and still answers its (gone) caller
    abandoned = await rpc_error(creating)
    assert abandoned.code == Code.CANCELLED and "c1" in abandoned.message
    assert state_root_entries(store) == [] and shim.service.sandbox is None and shim.service.tasks == {}
    assert shim.publisher.events == []
    # `store` checks that the VMM process is gone too


async def test_containerd_gone_during_a_create_leaves_nothing_and_the_shim_idle(
        shim: Shim, store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd stopped while the VM booted: its connection closes, the Create is cancelled and
    undone, and the shim, holding nothing a restarted containerd could delete, goes idle."""
    creating = await a_create_still_booting(shim, tmp_path, monkeypatch)
    await shim.client.close()
    with pytest.raises(KabutoError):
        await asyncio.wait_for(creating, BOUND)
    for _ in range(100):
        if shim.idle:
            break
        await asyncio.sleep(0.05)
    assert shim.idle == [True]
    assert state_root_entries(store) == [] and shim.service.sandbox is None and shim.service.tasks == {}


async def test_containerd_stopping_between_abandoning_a_create_and_shutdown_lets_the_shim_go(
        shim: Shim, store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd stopping (SIGTERM) cancels its Create call and, cleaning up, sends Delete (which
    abandons the create) and then Shutdown; a containerd that exits between the two never sends
    the Shutdown, and the restarted one reloads this shim from the bundle, finds no task and never
    deletes one. The shim left with nothing goes after the Delete (it stayed for ever: CI)."""
    creating = await a_create_still_booting(shim, tmp_path, monkeypatch)
    error = await rpc_error(shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse))
    assert error.code == Code.NOT_FOUND
    assert (await rpc_error(creating)).code == Code.CANCELLED
    await shim.client.close()  # containerd exits: no Shutdown
    assert shim.idle == [True]
    assert state_root_entries(store) == [] and shim.service.sandbox is None and shim.service.tasks == {}


async def test_close_stops_whatever_still_runs(shim: Shim, store: StateStore, tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    await asyncio.wait_for(shim.service.close(), BOUND)
    assert state_root_entries(store) == [] and shim.service.tasks == {}


async def test_a_second_shim_on_the_same_state_root_refuses_a_taken_id(shim: Shim, store: StateStore,
                                                                       tmp_path: Path) -> None:
    """Two containerd namespaces may both name a task c1; Kabuto's state root holds one."""
    bundle = fake_vm.make_bundle(tmp_path / "bundle", ["sleep"])
    await shim.create("c1", bundle)
    other = TaskService(store, RecordingPublisher(), on_idle=lambda: None)  # type: ignore[arg-type]
    request = pb.CreateTaskRequest(id="c1", bundle=str(bundle), options=shim.options())
    with pytest.raises(RpcError) as caught:
        await other.methods()["Create"].handler(request)
    assert caught.value.code == Code.ALREADY_EXISTS and "c1" in caught.value.message
    assert other.sandbox is None and set(fake_vm.GUESTS) == {"c1"}
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


# -- a task killed, deleted or closed before it started -------------------------------------
async def test_killing_a_created_task_ends_it(shim: Shim, tmp_path: Path) -> None:
    """CRI's clean-up after a failed start: Delete(WithProcessKill) kills the created task and
    waits for its exit before deleting; runc's shim reports that exit."""
    created = await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    waiting = asyncio.ensure_future(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse))
    await shim.call("Kill", pb.KillRequest(id="c1", signal=9, all=True))
    waited = await asyncio.wait_for(waiting, 5)
    assert waited.exit_status == 137
    state = await shim.call("State", pb.StateRequest(id="c1"), pb.StateResponse)
    assert (state.status, state.exit_status) == (task_types_pb.STOPPED, 137)
    exit_event = shim.publisher.events[-1]
    assert isinstance(exit_event, events_pb.TaskExit)
    assert (exit_event.container_id, exit_event.pid, exit_event.exit_status) == ("c1", created.pid, 137)
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_deleting_a_created_task_ends_its_waiters(shim: Shim, tmp_path: Path) -> None:
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    waiting = asyncio.ensure_future(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse))
    await asyncio.sleep(0.05)  # the Wait reached the shim
    deleted = await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
    waited = await asyncio.wait_for(waiting, 5)
    assert waited.exit_status == deleted.exit_status


async def test_stdin_closed_before_start_still_ends(shim: Shim, tmp_path: Path) -> None:
    stdin, stdout = fifo(tmp_path, "stdin"), fifo(tmp_path, "stdout")
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["cat"]), stdin=str(stdin),
                      stdout=str(stdout))
    writer = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)
    reader = FifoReader(stdout)
    os.write(writer, b"early\n")
    await shim.call("CloseIO", pb.CloseIORequest(id="c1", stdin=True))
    os.close(writer)
    await shim.call("Start", pb.StartRequest(id="c1"), pb.StartResponse)
    waited = await asyncio.wait_for(shim.call("Wait", pb.WaitRequest(id="c1"), pb.WaitResponse), 5)
    assert waited.exit_status == 0 and reader.join() == b"early\n"
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)


async def test_stats_are_cgroup_v2_metrics_with_the_guests_figures_bounded(
        shim: Shim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stats_container(self: Any, container_id: str) -> ContainerStats:
        # a hostile or broken guest: negative and unknown figures must not break containerd's fields
        return ContainerStats(cpu_usage_usec=1500, cpu_user_usec=-1, cpu_system_usec=None,
                              memory_usage_bytes=2**70, memory_limit_bytes=None, pids_current=3,
                              pids_limit=None, memory_oom_kills=None)

    monkeypatch.setattr(fake_vm.FakeContainers, "stats_container", stats_container, raising=False)
    await shim.create("c1", fake_vm.make_bundle(tmp_path / "bundle", ["sleep"]))
    response = await shim.call("Stats", pb.StatsRequest(id="c1"), pb.StatsResponse)
    assert response.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = cgroups_pb.Metrics.FromString(response.stats.value)
    assert (metrics.cpu.usage_usec, metrics.cpu.user_usec, metrics.cpu.system_usec) == (1500, 0, 0)
    assert (metrics.memory.usage, metrics.memory.usage_limit) == (0, 0)
    assert (metrics.pids.current, metrics.pids.limit) == (3, 0)
    await shim.call("Delete", pb.DeleteRequest(id="c1"), pb.DeleteResponse)
