"""The shim's containerd messages against the bytes containerd's Go code puts on the wire.

No Go toolchain here: the expected bytes are written out by hand from containerd v1.6.20's
.proto files (field numbers quoted next to each test) and protobuf's encoding rules (a tag is
``field << 3 | wire type``; 0 = varint, 2 = length-delimited). Go's marshalers emit fields in
field-number order, as Python's does, so both directions must match byte for byte.
"""

from __future__ import annotations

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from kabuto.protos import containerd_events_pb2 as events_pb
from kabuto.protos import containerd_events_ttrpc_pb2 as forward_pb
from kabuto.protos import containerd_runtimeoptions_pb2 as options_pb
from kabuto.protos import containerd_shim_pb2 as shim_pb
from kabuto.protos import containerd_task_types_pb2 as task_types_pb
from kabuto.protos import containerd_types_pb2 as types_pb
from kabuto.shim import events

# google.protobuf.Timestamp{seconds: 1700000000, nanos: 123456789}
#   08 <varint 1700000000 = 80 e2 cf aa 06>  10 <varint 123456789 = 95 9a ef 3a>
TIMESTAMP = b"\x08\x80\xe2\xcf\xaa\x06\x10\x95\x9a\xef\x3a"
assert len(TIMESTAMP) == 0x0B


def timestamp() -> Timestamp:
    return Timestamp(seconds=1_700_000_000, nanos=123_456_789)


def assert_wire(message: Message, wire: bytes) -> None:
    assert message.SerializeToString() == wire
    parsed = type(message)()
    parsed.ParseFromString(wire)
    assert parsed == message


def test_create_task_request() -> None:
    # runtime/v2/task/shim.proto: id=1 bundle=2 rootfs=3 terminal=4 stdin=5 stdout=6 stderr=7
    # checkpoint=8 parent_checkpoint=9 options=10; api/types/mount.proto: type=1 source=2
    # target=3 options=4; pkg/runtimeoptions/v1/api.proto: type_url=1 config_path=2
    mount = b"\x0a\x07overlay" + b"\x12\x01s" + b"\x22\x0blowerdir=/l"
    options = b"\x12\x07/k.toml"
    any_options = b"\x0a\x19runtimeoptions.v1.Options" + b"\x12\x09" + options
    wire = (b"\x0a\x02c1" + b"\x12\x02/b" + b"\x1a\x19" + mount + b"\x20\x01" + b"\x2a\x02/i"
            + b"\x32\x02/o" + b"\x3a\x02/e" + b"\x42\x02/c" + b"\x4a\x02/p" + b"\x52\x26" + any_options)
    assert len(mount) == 0x19 and len(any_options) == 0x26
    message = shim_pb.CreateTaskRequest(
        id="c1", bundle="/b", rootfs=[types_pb.Mount(type="overlay", source="s", options=["lowerdir=/l"])],
        terminal=True, stdin="/i", stdout="/o", stderr="/e", checkpoint="/c", parent_checkpoint="/p",
        options=AnyMessage(type_url="runtimeoptions.v1.Options",
                           value=options_pb.Options(config_path="/k.toml").SerializeToString()))
    assert_wire(message, wire)


def test_state_response() -> None:
    # shim.proto StateResponse: id=1 bundle=2 pid=3 status=4 stdin=5 stdout=6 stderr=7 terminal=8
    # exit_status=9 exited_at=10 exec_id=11; api/types/task/task.proto: STOPPED = 3
    wire = (b"\x0a\x02c1" + b"\x12\x02/b" + b"\x18\x92\x21" + b"\x20\x03" + b"\x2a\x02/i" + b"\x32\x02/o"
            + b"\x3a\x02/e" + b"\x40\x01" + b"\x48\x89\x01" + b"\x52\x0b" + TIMESTAMP + b"\x5a\x02e1")
    message = shim_pb.StateResponse(
        id="c1", bundle="/b", pid=4242, status=task_types_pb.STOPPED, stdin="/i", stdout="/o", stderr="/e",
        terminal=True, exit_status=137, exited_at=timestamp(), exec_id="e1")
    assert_wire(message, wire)


@pytest.mark.parametrize(("name", "number"), [("UNKNOWN", 0), ("CREATED", 1), ("RUNNING", 2), ("STOPPED", 3),
                                              ("PAUSED", 4), ("PAUSING", 5)])
def test_task_status_numbers(name: str, number: int) -> None:
    assert task_types_pb.Status.Value(name) == number


def test_wait_and_delete_responses() -> None:
    # shim.proto WaitResponse: exit_status=1 exited_at=2; DeleteResponse: pid=1 exit_status=2 exited_at=3
    assert_wire(shim_pb.WaitResponse(exit_status=137, exited_at=timestamp()),
                b"\x08\x89\x01" + b"\x12\x0b" + TIMESTAMP)
    assert_wire(shim_pb.DeleteResponse(pid=4242, exit_status=137, exited_at=timestamp()),
                b"\x08\x92\x21" + b"\x10\x89\x01" + b"\x1a\x0b" + TIMESTAMP)


def test_go_zero_time_decodes() -> None:
    # gogoproto stdtime, non-nullable: Go sends time.Time{} as seconds = -62135596800
    # (a ten-byte varint), never omits it
    wire = b"\x1a\x0b\x08\x80\x92\xb8\xc3\x98\xfe\xff\xff\xff\x01"
    parsed = shim_pb.DeleteResponse()
    parsed.ParseFromString(wire)
    assert parsed.exited_at.seconds == -62_135_596_800 and parsed.exit_status == 0


def test_exec_and_kill_requests() -> None:
    # ExecProcessRequest: id=1 exec_id=2 terminal=3 stdin=4 stdout=5 stderr=6 spec=7
    # KillRequest: id=1 exec_id=2 signal=3 all=4
    spec = b'{"args":["sh"]}'
    any_spec = b"\x0a\x01t" + b"\x12\x0f" + spec
    assert_wire(shim_pb.ExecProcessRequest(id="c1", exec_id="e1", terminal=True, stdin="/i", stdout="/o",
                                           stderr="/e", spec=AnyMessage(type_url="t", value=spec)),
                b"\x0a\x02c1\x12\x02e1\x18\x01\x22\x02/i\x2a\x02/o\x32\x02/e\x3a\x14" + any_spec)
    assert_wire(shim_pb.KillRequest(id="c1", exec_id="e1", signal=9, all=True),
                b"\x0a\x02c1\x12\x02e1\x18\x09\x20\x01")


def test_task_exit_event() -> None:
    # api/events/task.proto TaskExit: container_id=1 id=2 pid=3 exit_status=4 exited_at=5
    assert_wire(events_pb.TaskExit(container_id="c1", id="e1", pid=4242, exit_status=137,
                                   exited_at=timestamp()),
                b"\x0a\x02c1\x12\x02e1\x18\x92\x21\x20\x89\x01\x2a\x0b" + TIMESTAMP)


def test_task_create_and_delete_events() -> None:
    # TaskCreate: container_id=1 bundle=2 rootfs=3 io=4 checkpoint=5 pid=6;
    # TaskIO: stdin=1 stdout=2 stderr=3 terminal=4; TaskDelete: container_id=1 pid=2 exit_status=3
    # exited_at=4 id=5
    io = b"\x0a\x02/i\x12\x02/o\x1a\x02/e\x20\x01"
    assert_wire(events_pb.TaskCreate(container_id="c1", bundle="/b", rootfs=[types_pb.Mount(type="bind")],
                                     io=events_pb.TaskIO(stdin="/i", stdout="/o", stderr="/e", terminal=True),
                                     checkpoint="/c", pid=7),
                b"\x0a\x02c1\x12\x02/b\x1a\x06\x0a\x04bind\x22\x0e" + io + b"\x2a\x02/c\x30\x07")
    assert_wire(events_pb.TaskDelete(container_id="c1", pid=7, exit_status=1, exited_at=timestamp(), id="e1"),
                b"\x0a\x02c1\x10\x07\x18\x01\x22\x0b" + TIMESTAMP + b"\x2a\x02e1")


def test_forward_request_envelope() -> None:
    # api/services/ttrpc/events/v1/events.proto ForwardRequest: envelope=1;
    # Envelope: timestamp=1 namespace=2 topic=3 event=4; google.protobuf.Any: type_url=1 value=2
    event = b"\x0a\x02c1"  # TaskPaused{container_id: "c1"}
    any_event = b"\x0a\x1ccontainerd.events.TaskPaused" + b"\x12\x04" + event
    envelope = (b"\x0a\x0b" + TIMESTAMP + b"\x12\x07default" + b"\x1a\x0d/tasks/paused" + b"\x22\x24"
                + any_event)
    assert len(any_event) == 0x24
    message = forward_pb.ForwardRequest(envelope=forward_pb.Envelope(
        timestamp=timestamp(), namespace="default", topic="/tasks/paused",
        event=AnyMessage(type_url="containerd.events.TaskPaused", value=event)))
    assert_wire(message, b"\x0a\x4b" + envelope)
    assert len(envelope) == 0x4b


def test_full_names_match_containerds_packages() -> None:
    # the names ttrpc routes by and typeurl resolves
    assert shim_pb.DESCRIPTOR.services_by_name["Task"].full_name == "containerd.task.v2.Task"
    assert forward_pb.DESCRIPTOR.services_by_name["Events"].full_name == events.EVENTS_SERVICE \
        == "containerd.services.events.ttrpc.v1.Events"
    assert options_pb.Options.DESCRIPTOR.full_name == "runtimeoptions.v1.Options"
    assert types_pb.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"


# runtime/events.go in containerd v1.6.20
CONTAINERD_TOPICS = [
    (events_pb.TaskCreate(container_id="c"), "/tasks/create"),
    (events_pb.TaskStart(container_id="c", pid=1), "/tasks/start"),
    (events_pb.TaskExit(container_id="c", id="c"), "/tasks/exit"),
    (events_pb.TaskDelete(container_id="c"), "/tasks/delete"),
    (events_pb.TaskExecAdded(container_id="c", exec_id="e"), "/tasks/exec-added"),
    (events_pb.TaskExecStarted(container_id="c", exec_id="e"), "/tasks/exec-started"),
    (events_pb.TaskPaused(container_id="c"), "/tasks/paused"),
    (events_pb.TaskResumed(container_id="c"), "/tasks/resumed"),
    (events_pb.TaskOOM(container_id="c"), "/tasks/oom"),
]


@pytest.mark.parametrize(("event", "topic"), CONTAINERD_TOPICS,
                         ids=[type(event).__name__ for event, _ in CONTAINERD_TOPICS])
def test_envelope_type_url_and_topic(event: Message, topic: str) -> None:
    envelope = events.envelope("k8s.io", event)
    assert envelope.namespace == "k8s.io"
    assert envelope.topic == topic
    # typeurl falls back to proto.MessageName for events: no type.googleapis.com/ prefix
    assert envelope.event.type_url == f"containerd.events.{type(event).__name__}"
    assert envelope.event.value == event.SerializeToString()
    assert envelope.timestamp.seconds > 1_600_000_000
