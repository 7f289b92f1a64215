"""The agent's side of a process's stdio: bounded output buffers and a stdin writer.

An output stream reads its pipe (or pty master) into a buffer of at most ``limit`` bytes
and stops reading while the buffer is full, so a process that writes faster than the host
reads blocks in write(2) instead of the agent growing without bound. Nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os

log = logging.getLogger(__name__)

OUTPUT_BUFFER_LIMIT = 1 << 20
READ_CHUNK = 1 << 20


class StreamClosed(Exception):
    """The stream's fd is gone (stdin closed, or the process closed its end)."""


class OutputStream:
    """One output of a process (stdout, stderr or a pty), read by long polls."""

    def __init__(self, fd: int | None, limit: int = OUTPUT_BUFFER_LIMIT) -> None:
        """``fd``: non-blocking, now owned by the stream; None: a stream at end of file."""
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._limit = limit
        self._buffer = bytearray()
        self._readable = asyncio.Event()  # set while there is data or end of file
        self._reading = False
        self.eof = fd is None
        self.drained = fd is None  # end of file and the buffer handed out
        if fd is None:
            self._readable.set()
        else:
            self._resume()

    def _resume(self) -> None:
        if not self._reading and self._fd is not None:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _pause(self) -> None:
        if self._reading and self._fd is not None:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, min(READ_CHUNK, self._limit - len(self._buffer)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # A pty master reports the last close of its slave as EIO: end of file. Any
            # other error ends the stream too (raising here would only repeat forever).
            if exc.errno != errno.EIO:
                log.warning("reading a process's output failed: %s", exc)
            data = b""
        if data:
            self._buffer += data
            if len(self._buffer) >= self._limit:
                self._pause()
        else:
            self._close_fd()
            self.eof = True
        self._readable.set()

    def _close_fd(self) -> None:
        self._pause()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def read(self, max_len: int) -> bytes:
        """Up to ``max_len`` bytes once there are any; b"" at end of file."""
        await self._readable.wait()
        data = bytes(self._buffer[:max_len])
        del self._buffer[:max_len]
        if not self._buffer:
            if self.eof:
                self.drained = True
            else:
                self._readable.clear()
        if not self.eof and len(self._buffer) < self._limit:
            self._resume()
        return data

    def close(self) -> None:
        """Stop reading (the process is being forgotten); pending readers see end of file."""
        self._close_fd()
        self._buffer.clear()
        self.eof = self.drained = True
        self._readable.set()


class InputStream:
    """A process's stdin: a pipe's write end, or the pty master shared with its output."""

    def __init__(self, fd: int, *, tty: bool) -> None:
        """``fd``: non-blocking, now owned by the stream (for a pty, a dup of the master)."""
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = fd
        self.tty = tty
        self._write_lock = asyncio.Lock()

    async def write(self, data: bytes, deadline: float | None) -> int:
        """Write all of ``data``, waiting for room until ``deadline`` (loop time; None:
        no limit); returns how much was written."""
        view = memoryview(data)
        written = 0
        async with self._write_lock:
            while written < len(view):
                if self._fd is None:
                    raise StreamClosed("stdin is closed")
                try:
                    written += os.write(self._fd, view[written:])
                    continue
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    raise StreamClosed("the process closed its stdin") from None
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                    raise StreamClosed("the process's terminal is closed") from None
                if not await self._wait_writable(deadline):
                    break
        return written

    async def _wait_writable(self, deadline: float | None) -> bool:
        """False when the deadline came first."""
        assert self._fd is not None
        ready = self._loop.create_future()
        fd = self._fd
        self._loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        except TimeoutError:
            return False
        finally:
            self._loop.remove_writer(fd)
        return True

    def close(self) -> None:
        """End of input: close the pipe, or send the terminal's EOF character."""
        if self._fd is None:
            return
        if self.tty:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"\x04")
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
