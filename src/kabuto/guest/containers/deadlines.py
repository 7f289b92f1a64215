"""The caller's ttrpc deadline: long polls answer a little before it, with nothing consumed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from kabuto.ttrpc import Code, RpcError, current_call

# A long poll answers this long before the caller's deadline (at most a tenth of the wait).
POLL_MARGIN = 1.0

R = TypeVar("R")


def poll_deadline() -> float | None:
    """When a long poll must answer: a little before the caller gives up."""
    deadline = current_call.get().deadline
    if deadline is None:
        return None
    remaining = deadline - asyncio.get_running_loop().time()
    return deadline - min(POLL_MARGIN, max(remaining, 0) / 10)


def deadline_within(timeout: float) -> float:
    """``timeout`` from now, or the long-poll deadline if the caller gives up sooner."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    call_deadline = poll_deadline()
    return deadline if call_deadline is None else min(deadline, call_deadline)


def caller_deadline_or(timeout: float) -> float:
    """The long-poll deadline of a caller that set one (the host bounds the call: a longer
    create_container_timeout must reach the process's set-up), else ``timeout`` from now."""
    call_deadline = poll_deadline()
    return asyncio.get_running_loop().time() + timeout if call_deadline is None else call_deadline


async def until_poll_deadline(awaitable: Awaitable[R], what: str) -> R:
    try:
        async with asyncio.timeout_at(poll_deadline()):
            return await awaitable
    except TimeoutError:
        raise RpcError(Code.DEADLINE_EXCEEDED, f"{what}: nothing yet, call again") from None
