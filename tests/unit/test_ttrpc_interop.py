"""kabuto.ttrpc's client against containerd's own ttrpc server (Go), in containerd-shim-runc-v2.

The shim is the ttrpc server containerd talks to; answering our calls proves the framing
and the envelope (field numbers, status) match containerd's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.message import Message

from kabuto.ttrpc import Client, Code, RpcError

SHIM = shutil.which("containerd-shim-runc-v2")
pytestmark = pytest.mark.skipif(SHIM is None, reason="containerd-shim-runc-v2 is not installed")
TASK_SERVICE = "containerd.task.v2.Task"


def task_messages() -> dict[str, type[Message]]:
    """The two containerd.task.v2 messages used here, built at run time (same field numbers)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="kabuto_test_task.proto", package="kabuto.test", syntax="proto3"
    )
    string, uint32 = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    )
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    request = file.message_type.add(name="ConnectRequest")
    request.field.add(name="id", number=1, type=string, label=optional)
    response = file.message_type.add(name="ConnectResponse")
    response.field.add(name="shim_pid", number=1, type=uint32, label=optional)
    response.field.add(name="task_pid", number=2, type=uint32, label=optional)
    response.field.add(name="version", number=3, type=string, label=optional)
    return message_factory.GetMessages([file])


@pytest.fixture
async def shim(tmp_path: Path) -> AsyncIterator[tuple[Client, asyncio.subprocess.Process]]:
    """The shim serving ttrpc on a socket of ours (no containerd needed for these calls)."""
    socket_path = tmp_path / "shim.sock"
    os.mkfifo(tmp_path / "log")  # the shim writes its log into ./log, a FIFO we hold open
    log_fd = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    process = await asyncio.create_subprocess_exec(
        SHIM or "",
        *("-namespace", "kabuto-test", "-id", "interop", "-address", str(tmp_path / "containerd.sock")),
        *("-socket", str(socket_path)),
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(socket_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
        client = Client(reader, writer, name="containerd-shim-runc-v2")
        yield client, process
        await client.close()
    finally:
        process.kill()
        await asyncio.wait_for(process.wait(), 10)
        os.close(log_fd)


async def test_unary_call_to_containerds_ttrpc_server(
    shim: tuple[Client, asyncio.subprocess.Process],
) -> None:
    client, process = shim
    messages = task_messages()
    request = messages["kabuto.test.ConnectRequest"](id="interop")
    response = await client.call(
        TASK_SERVICE,
        "Connect",
        request,
        messages["kabuto.test.ConnectResponse"],
        timeout=10,
        metadata={"containerd-namespace-ttrpc": "kabuto-test"},
    )
    assert response.shim_pid == process.pid


async def test_statuses_from_containerds_ttrpc_server(
    shim: tuple[Client, asyncio.subprocess.Process],
) -> None:
    client, _ = shim
    messages = task_messages()
    request = messages["kabuto.test.ConnectRequest"](id="interop")
    with pytest.raises(RpcError) as caught:
        await client.call(TASK_SERVICE, "NoSuchMethod", request, request.__class__, timeout=10)
    assert caught.value.code == Code.UNIMPLEMENTED
    # State of a task that was never created: the shim's own error, code and message.
    with pytest.raises(RpcError) as caught:
        await client.call(TASK_SERVICE, "State", request, request.__class__, timeout=10)
    assert caught.value.code == Code.NOT_FOUND
    assert "not created" in caught.value.message
