"""Reading the launcher's report pipes in the agent: JSON lines, bounded, asynchronous."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from typing import Any

MAX_LINE = 8192


class MessagePipe:
    """The read end of a report pipe (owned; made non-blocking here)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = fd
        self._buffer = bytearray()
        self._eof = False

    async def next(self) -> dict[str, Any] | None:
        """The next message; None at end of file (every writer closed or exec'd)."""
        while b"\n" not in self._buffer:
            if self._eof or self._fd is None:
                return None
            await self._fill()
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except ValueError:
            return {"error": f"garbled report from the launcher: {line[:100]!r}"}
        return message if isinstance(message, dict) else {"error": "garbled report from the launcher"}

    async def _fill(self) -> None:
        assert self._fd is not None
        fd = self._fd
        ready = self._loop.create_future()
        self._loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self._loop.remove_reader(fd)
        try:
            data = os.read(fd, MAX_LINE)
        except BlockingIOError:
            return
        if not data:
            self._eof = True
            return
        self._buffer += data
        if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
            self._buffer = bytearray(b'{"error": "oversized report from the launcher"}\n')
            self._eof = True

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
