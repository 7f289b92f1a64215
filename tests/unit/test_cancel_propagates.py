"""A caller cancelled (Ctrl-C in `kabuto vm boot`) while it waits for a helper task to end is
still cancelled: waiting for a task's end must not swallow the caller's own CancelledError."""

from __future__ import annotations

import asyncio
import socket

import pytest

from kabuto.hypervisor.vmm_process import VmmProcess
from kabuto.ttrpc import Client


async def _slow_to_end() -> None:
    """A task that takes a while to finish after it is cancelled (as a copier mid-write)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.5)
        raise


async def _cancel_while(waiting: asyncio.Task[None]) -> None:
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_output_done_lets_the_callers_cancel_through(tmp_path):
    process = VmmProcess("vm", "QEMU", tmp_path / "log")
    process._pump = asyncio.create_task(_slow_to_end())
    await _cancel_while(asyncio.create_task(process.output_done()))
    process._pump.cancel()
    await asyncio.gather(process._pump, return_exceptions=True)


async def test_client_close_lets_the_callers_cancel_through():
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    client = Client(reader, writer, name="peer")
    client._read_task.cancel()
    await asyncio.gather(client._read_task, return_exceptions=True)
    client._read_task = asyncio.create_task(_slow_to_end())
    await _cancel_while(asyncio.create_task(client.close()))
    client._read_task.cancel()
    await asyncio.gather(client._read_task, return_exceptions=True)
    writer.close()
    right.close()
