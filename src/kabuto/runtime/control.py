"""The control socket of a streaming ``kabuto run``: while it holds its sandbox, a ``kabuto
kill`` that cannot take the sandbox's lock reaches the containers through it (one JSON line in,
one line out, both bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from kabuto.errors import KabutoError
from kabuto.runtime.sandbox import SandboxError, VirtSandbox

CONTROL_SOCKET = "control.sock"


CONTROL_TIMEOUT = 30.0


CONTROL_LINE_LIMIT = 4096


@contextlib.asynccontextmanager
async def control_socket(sandbox: VirtSandbox) -> AsyncIterator[None]:
    """While this `run` lasts, a `kabuto kill` that cannot take the sandbox's lock reaches the
    containers through it: one JSON line in, one line out."""
    path = sandbox.directory / CONTROL_SOCKET

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                request = json.loads(await reader.readuntil(b"\n"))
                await sandbox.kill(str(request["container"]), parse_signal(int(request["signal"])),
                                   all_processes=bool(request.get("all")))
            answer = "ok"
        except (KabutoError, ValueError, KeyError, TypeError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, TimeoutError) as exc:
            answer = f"error: {exc}"
        with contextlib.suppress(OSError):
            writer.write(answer.encode()[:CONTROL_LINE_LIMIT] + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path), limit=CONTROL_LINE_LIMIT)
    try:
        yield
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_TIMEOUT):
                await server.wait_closed()
        _unlink(path)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


async def kill_via_owner(path: Path, container_id: str, number: int, all_processes: bool) -> None:
    request = json.dumps({"container": container_id, "signal": number, "all": all_processes})
    try:
        async with asyncio.timeout(CONTROL_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=CONTROL_LINE_LIMIT)
            try:
                writer.write(request.encode() + b"\n")
                await writer.drain()
                answer = (await reader.readline()).decode(errors="replace").strip()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError) as exc:
        raise SandboxError(f"container {container_id!r}: its sandbox is busy and its owner cannot be "
                           f"reached ({exc})") from None
    if answer != "ok":
        raise SandboxError(answer.removeprefix("error: ") or f"container {container_id!r}: no answer")


def parse_signal(value: str | int) -> int:
    """``KILL``, ``SIGKILL``, ``9``: runc's spellings."""
    if isinstance(value, int) or str(value).isdigit():
        number = int(value)
        if not 0 < number < signal.NSIG:
            raise KabutoError(f"invalid signal {value!r}")
        return number
    name = str(value).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise KabutoError(f"invalid signal {value!r}") from None
