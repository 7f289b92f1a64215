"""The shim's stdio against real FIFOs, as containerd creates them (os.mkfifo in a directory)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from kabuto.shim.stdio import ProcessStdio, StdioError, write_all

BOUND = 10.0


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fifo(directory: Path, name: str) -> Path:
    path = directory / name
    os.mkfifo(path)
    return path


def test_stdin_is_not_at_end_before_containerd_opened_its_end(tmp_path: Path) -> None:
    # containerd's fifo package opens its write end in the background, after the shim opened
    # the read end: until then there is simply nothing to read yet
    stdio = ProcessStdio.open(str(fifo(tmp_path, "stdin")), "", "", False)
    try:
        assert stdio.read_stdin() is None
    finally:
        stdio.close()


def test_stdin_data_then_end_of_file_when_the_writer_closes(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdin")
    stdio = ProcessStdio.open(str(path), "", "", False)
    try:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        assert stdio.read_stdin() is None  # a writer, but nothing written yet
        os.write(writer, b"hello")
        assert stdio.read_stdin() == b"hello"
        assert stdio.read_stdin() is None
        os.write(writer, b"bye")
        os.close(writer)
        assert stdio.read_stdin() == b"bye"  # what was written before closing comes first
        assert stdio.read_stdin() == b""
    finally:
        stdio.close()


async def test_wait_stdin_wakes_when_told_to_stop(tmp_path: Path) -> None:
    # containerd's CloseIO while nothing is left to read
    stdio = ProcessStdio.open(str(fifo(tmp_path, "stdin")), "", "", False)
    stop = asyncio.Event()
    try:
        waiting = asyncio.ensure_future(stdio.wait_stdin(stop))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        stop.set()
        await asyncio.wait_for(waiting, BOUND)
        assert stdio.read_stdin() is None
    finally:
        stdio.close()


async def test_wait_stdin_wakes_on_data_and_on_hang_up(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdin")
    stdio = ProcessStdio.open(str(path), "", "", False)
    never = asyncio.Event()
    try:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        waiting = asyncio.ensure_future(stdio.wait_stdin(never))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        os.write(writer, b"x")
        await asyncio.wait_for(waiting, BOUND)
        assert stdio.read_stdin() == b"x"
        waiting = asyncio.ensure_future(stdio.wait_stdin(never))
        os.close(writer)
        await asyncio.wait_for(waiting, BOUND)
        assert stdio.read_stdin() == b""
    finally:
        stdio.close()


async def test_output_through_a_slow_reader_loses_and_reorders_nothing(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdout")
    # every 4-byte word distinct: a lost or repeated chunk shows
    data = b"".join(n.to_bytes(4, "big") for n in range(256 * 1024))
    received = bytearray()

    def slow_reader() -> None:
        with open(path, "rb", buffering=0) as reader:
            while chunk := reader.read(4096):
                received.extend(chunk)
                time.sleep(0.0002)

    stdio = ProcessStdio.open("", str(path), "", False)
    thread = threading.Thread(target=slow_reader)
    thread.start()
    try:
        assert stdio.stdout_fd is not None
        offset = 0
        for size in (1, 70_000, 300_000, 5, len(data)):  # sizes below and above the pipe's 64 KiB
            await asyncio.wait_for(write_all(stdio.stdout_fd, data[offset:offset + size]), BOUND)
            offset += size
        stdio.close()  # the last writer gone: the reader sees end of file
    finally:
        stdio.close()
        thread.join(BOUND)
    assert not thread.is_alive()
    assert len(received) == len(data) and received == data


async def test_output_waits_for_the_next_reader(tmp_path: Path) -> None:
    # ctr detaching or containerd restarting: the shim must neither block nor get EPIPE
    path = fifo(tmp_path, "stdout")
    stdio = ProcessStdio.open("", str(path), "", False)
    try:
        assert stdio.stdout_fd is not None
        await asyncio.wait_for(write_all(stdio.stdout_fd, b"before any reader\n"), BOUND)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        assert os.read(reader, 100) == b"before any reader\n"
        os.close(reader)
        await asyncio.wait_for(write_all(stdio.stdout_fd, b"after the reader left\n"), BOUND)
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        assert os.read(reader, 100) == b"after the reader left\n"
        os.close(reader)
    finally:
        stdio.close()


async def test_file_uri_output_appends(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "c1.log"
    log.parent.mkdir()
    log.write_bytes(b"earlier run\n")
    stdio = ProcessStdio.open("", f"file://{log}", f"file://{tmp_path / 'new' / 'err.log'}", False)
    try:
        assert stdio.stdout_fd is not None and stdio.stderr_fd is not None
        await write_all(stdio.stdout_fd, b"this run\n")
        await write_all(stdio.stderr_fd, b"oops\n")
    finally:
        stdio.close()
    assert log.read_bytes() == b"earlier run\nthis run\n"
    assert (tmp_path / "new" / "err.log").read_bytes() == b"oops\n"


@pytest.mark.parametrize("stream", ["stdin", "stdout", "stderr"])
def test_regular_file_is_refused_naming_it(tmp_path: Path, stream: str) -> None:
    regular = tmp_path / "not-a-fifo"
    regular.write_text("")
    paths = {"stdin": "", "stdout": "", "stderr": ""} | {stream: str(regular)}
    with pytest.raises(StdioError, match=f"{regular}.*not a FIFO"):
        ProcessStdio.open(paths["stdin"], paths["stdout"], paths["stderr"], False)


def test_missing_fifo_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StdioError, match=str(tmp_path / "gone")):
        ProcessStdio.open("", str(tmp_path / "gone"), "", False)


def test_unsupported_uri_is_refused_naming_it() -> None:
    with pytest.raises(StdioError, match="binary:///usr/bin/logger"):
        ProcessStdio.open("", "binary:///usr/bin/logger", "", False)


def test_a_refused_stream_leaves_no_descriptor_open(tmp_path: Path) -> None:
    stdin, stdout = fifo(tmp_path, "stdin"), fifo(tmp_path, "stdout")
    before = open_fds()
    with pytest.raises(StdioError, match="stderr-missing"):
        ProcessStdio.open(str(stdin), str(stdout), str(tmp_path / "stderr-missing"), False)
    assert open_fds() == before


def test_close_releases_every_descriptor(tmp_path: Path) -> None:
    before = open_fds()
    stdio = ProcessStdio.open(str(fifo(tmp_path, "i")), str(fifo(tmp_path, "o")), f"file://{tmp_path}/e",
                              False)
    assert len(open_fds() - before) == 3
    stdio.close_stdin()
    stdio.close()
    assert open_fds() == before
    assert stdio.read_stdin() == b""  # a closed stdin reads as ended
