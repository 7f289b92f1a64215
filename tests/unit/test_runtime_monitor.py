"""The host process standing for a detached container's process: copies until end of file,
never blocks the container on a reader that went away, sends a pty master as runc does;
`delete` ends it without touching a reused pid."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import subprocess
import sys
import termios
from typing import Any

import psutil

from kabuto.runtime import detached, monitor
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


def test_the_pty_master_goes_over_the_console_socket_as_runc_sends_it() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        slave = monitor.send_console(ours)
        fds = array.array("i")
        name, ancillary, _, _ = theirs.recvmsg(256, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(data[:fds.itemsize])
    master = fds[0]
    try:
        assert name == b"/dev/ptmx" and os.isatty(master)
        # the slave is raw: bytes pass unchanged both ways (the guest's pty does the line discipline)
        assert not termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO)
        os.write(master, b"in\r")
        assert os.read(slave, 16) == b"in\r"
        os.write(slave, b"out\n")
        assert os.read(master, 16) == b"out\n"
    finally:
        os.close(master)
        os.close(slave)
