"""The detached container's output pump: copies until end of file, never blocks the container
on a reader that went away; `delete` ends a pump without touching a reused pid."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import psutil

from kabuto.runtime import detached
from kabuto.runtime.monitor import copy_stream


class FakeContainers:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = {"stdout": list(chunks), "stderr": [b"err"]}

    async def _next(self, stream: str) -> bytes:
        return self.chunks[stream].pop(0) if self.chunks[stream] else b""

    async def read_stdout(self, container_id: str, exec_id: str, max_len: int) -> bytes:
        assert (container_id, exec_id) == ("c1", "")
        return await self._next("stdout")

    async def read_stderr(self, container_id: str, exec_id: str, max_len: int) -> bytes:
        return await self._next("stderr")


async def test_copies_every_chunk_until_end_of_file() -> None:
    chunks = [bytes([n]) * 70000 for n in range(5)]
    read_end, write_end = os.pipe()
    try:
        fake: Any = FakeContainers(chunks)
        # more than a pipe buffer: read it back as it is written
        with os.fdopen(read_end, "rb") as reader:
            task = asyncio.create_task(copy_stream(fake, "c1", "stdout", write_end))
            received = await asyncio.to_thread(reader.read, sum(map(len, chunks)))
            await task
    finally:
        os.close(write_end)
    assert received == b"".join(chunks)
    assert fake.chunks["stdout"] == []


async def test_a_closed_reader_does_not_stop_the_draining() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    fake: Any = FakeContainers([b"a", b"b", b"c"])
    try:
        await copy_stream(fake, "c1", "stdout", write_end)
    finally:
        os.close(write_end)
    assert fake.chunks["stdout"] == []


def test_end_monitor_kills_the_recorded_process_only() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(process.pid).create_time()
        # another process now holding the pid: left alone
        detached.end_monitor({"pid": process.pid, "create_time": created - 100}, grace=0.0)
        assert process.poll() is None
        detached.end_monitor({"pid": process.pid, "create_time": created}, grace=0.0)
        # end_monitor may have reaped it already (then Popen cannot see its status)
        process.wait(timeout=10)
        assert not psutil.pid_exists(process.pid) or psutil.Process(process.pid).create_time() != created
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
