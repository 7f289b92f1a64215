"""The guest bounds a process's set-up by the caller's deadline when it sent one: a host
create_container_timeout longer than the guest's own 60 s default reaches the set-up."""

from __future__ import annotations

import asyncio

import pytest

from kabuto.guest.containers.deadlines import POLL_MARGIN, caller_deadline_or
from kabuto.guest.containers.processes import SETUP_TIMEOUT
from kabuto.ttrpc import CallContext, current_call


def call(deadline: float | None) -> None:
    current_call.set(CallContext("grpc.AgentService", "CreateContainer", 1, {}, deadline))


async def test_a_longer_caller_deadline_bounds_the_setup() -> None:
    now = asyncio.get_running_loop().time()
    call(now + 300)
    assert caller_deadline_or(SETUP_TIMEOUT) == pytest.approx(now + 300 - POLL_MARGIN, abs=0.05)


async def test_a_shorter_caller_deadline_bounds_the_setup() -> None:
    now = asyncio.get_running_loop().time()
    call(now + 5)
    # a tenth of the wait, under 1 s
    assert caller_deadline_or(SETUP_TIMEOUT) == pytest.approx(now + 5 - 0.5, abs=0.05)


async def test_without_a_caller_deadline_the_guest_default_holds() -> None:
    call(None)
    before = asyncio.get_running_loop().time()
    deadline = caller_deadline_or(SETUP_TIMEOUT)
    assert before + SETUP_TIMEOUT <= deadline <= asyncio.get_running_loop().time() + SETUP_TIMEOUT
