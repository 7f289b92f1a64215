"""The guest's serial console: a bounded tail in memory, a bounded log file on disk.

The guest writes it, so both are capped; the tail goes into boot-failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import BinaryIO

CONSOLE_TAIL_BYTES = 64 * 1024
CONSOLE_LOG_MAX_BYTES = 1024 * 1024


class ConsoleReader:
    """Reads QEMU's console socket until it closes or ``stop`` is called."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._tail = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._task = asyncio.create_task(self._pump(reader))

    def tail(self) -> bytes:
        return bytes(self._tail)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        written = 0
        with _open_log(self.log_path) as log_file:
            while chunk := await reader.read(4096):
                self._tail += chunk
                del self._tail[:-CONSOLE_TAIL_BYTES]
                if written < CONSOLE_LOG_MAX_BYTES:
                    piece = chunk[: CONSOLE_LOG_MAX_BYTES - written]
                    log_file.write(piece)
                    log_file.flush()
                    written += len(piece)
                    if written >= CONSOLE_LOG_MAX_BYTES:
                        log_file.write(b"\n[kabuto: console log truncated]\n")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def _open_log(path: Path) -> BinaryIO:
    # small local writes; not worth a thread hop
    return open(path, "ab")


def printable(data: bytes) -> str:
    """Console bytes as text an error message can carry (control characters shown as '?')."""
    text = data.decode(errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text.replace("\r", ""))
