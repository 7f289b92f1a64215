"""The cache daemon's wire protocol: one JSON object per line over a Unix stream socket.

Every line is bounded (MAX_LINE) and every read waits a bounded time, on both sides: neither a
client nor the daemon hangs on a peer that stopped answering or sends without end.

    client -> {"op": "take", "key": K}               a VM of configuration K, if one is ready
    daemon -> {"vm": HypervisorState} | {"none": reason}   at once: no VM ready means a cold boot
    client -> {"op": "taken"}                        the client recorded the VM: it is its own
    daemon -> {"ok": true}
    client -> {"op": "status"}
    daemon -> {"ready": n, "booting": n, "number": N, "key": K, "pid": P}
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kabuto.errors import KabutoError

#: a hypervisor state with its whole table is a few KiB
MAX_LINE = 256 * 1024
#: how long either side waits for a line the protocol says comes at once
LINE_TIMEOUT = 5.0


class CacheProtocolError(KabutoError):
    """The peer broke the protocol, went away or did not answer in time."""


async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise CacheProtocolError(f"message of {len(line)} bytes is over the {MAX_LINE}-byte limit")
    writer.write(line)
    try:
        async with asyncio.timeout(LINE_TIMEOUT):
            await writer.drain()
    except TimeoutError:
        raise CacheProtocolError(f"the peer took no data for {LINE_TIMEOUT:g}s") from None
    except OSError as exc:
        raise CacheProtocolError(f"the peer went away: {exc.strerror or exc}") from None


async def receive(reader: asyncio.StreamReader, timeout: float | None = None) -> dict[str, Any]:
    """The next message within ``timeout`` seconds (default LINE_TIMEOUT; the reader's limit
    bounds its size)."""
    timeout = LINE_TIMEOUT if timeout is None else timeout
    try:
        async with asyncio.timeout(timeout):
            line = await reader.readline()
    except TimeoutError:
        raise CacheProtocolError(f"no answer within {timeout:g}s") from None
    except ValueError:  # asyncio's "separator is not found, and chunk exceed the limit"
        raise CacheProtocolError(f"a line over the {MAX_LINE}-byte limit") from None
    except OSError as exc:
        raise CacheProtocolError(f"the connection failed: {exc.strerror or exc}") from None
    if not line.endswith(b"\n"):
        raise CacheProtocolError("the peer closed the connection" + (" mid-line" if line else ""))
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise CacheProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise CacheProtocolError("a message that is no JSON object")
    return message
