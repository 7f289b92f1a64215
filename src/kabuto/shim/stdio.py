"""A process's stdio as containerd hands it over: FIFO paths (or ``file://`` URIs, or nothing).

Output FIFOs are opened read-write, as containerd's runc shim keeps both ends open, so that
opening never waits for the other side and a reader that goes away (``ctr`` detaching, containerd
restarting) does not break the pipe: output waits in the FIFO for the next reader instead.
stdin is opened read-only and non-blocking: its end of file is the writer closing (Linux reports
that hang-up only for a writer that came after our open, so an early poll never sees a false end).
The guest's output is read through the agent and written here; stdin read here goes to the agent
until that end of file, or containerd's CloseIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from kabuto.errors import KabutoError

READ_CHUNK = 64 * 1024


class StdioError(KabutoError):
    """A stdio path containerd gave cannot be used."""


def _open_output(target: str) -> int | None:
    if not target:
        return None
    if "://" in target:
        url = urlparse(target)
        if url.scheme != "file":
            raise StdioError(f"stdio URI {target!r}: only fifo paths and file:// are supported")
        path = Path(url.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return _open_fifo(target)


def _open_fifo(path: str, flags: int = os.O_RDWR) -> int:
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise StdioError(f"stdio path {path!r} is not a FIFO")
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StdioError(f"cannot open stdio FIFO {path!r}: {exc.strerror}") from None


async def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting (without a thread) while the FIFO is full."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(fd, writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(fd)


@dataclass
class ProcessStdio:
    """The host ends of one process's stdio; fds are None where containerd gave no path."""

    stdin_path: str = ""
    stdout_path: str = ""
    stderr_path: str = ""
    terminal: bool = False
    stdin_fd: int | None = None
    stdout_fd: int | None = None
    stderr_fd: int | None = None
    _fds: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, stdin: str, stdout: str, stderr: str, terminal: bool) -> ProcessStdio:
        stdio = cls(stdin, stdout, stderr, terminal)
        try:
            if stdin:
                stdio.stdin_fd = _open_fifo(stdin, os.O_RDONLY)
                stdio._fds.append(stdio.stdin_fd)
            for name, target in (("stdout", stdout), ("stderr", stderr)):
                fd = _open_output(target)
                if fd is not None:
                    setattr(stdio, f"{name}_fd", fd)
                    stdio._fds.append(fd)
        except BaseException:
            stdio.close()
            raise
        return stdio

    def output_fd(self, stream: str) -> int | None:
        return self.stdout_fd if stream == "stdout" else self.stderr_fd

    def read_stdin(self) -> bytes | None:
        """The next chunk of stdin: b"" at end of file, None when nothing is waiting."""
        if self.stdin_fd is None:
            return b""
        # a FIFO no writer has opened yet reads as end of file: only a hang-up (a writer that
        # came and went) or data make it readable
        poller = select.poll()
        poller.register(self.stdin_fd, select.POLLIN)
        if not poller.poll(0):
            return None
        try:
            return os.read(self.stdin_fd, READ_CHUNK)
        except BlockingIOError:
            return None

    async def wait_stdin(self, stop: asyncio.Event) -> None:
        """Until stdin is readable (data or end of file), or ``stop`` is set."""
        assert self.stdin_fd is not None
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(self.stdin_fd, lambda: readable.done() or readable.set_result(None))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([readable, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(self.stdin_fd)
            stopped.cancel()
            readable.cancel()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self._close(self.stdin_fd)
            self.stdin_fd = None

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.stdin_fd = self.stdout_fd = self.stderr_fd = None

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
