"""Freshening a VM that was not just booted (restored from a template, or kept warm): before
any container starts it gets the host's entropy and wall clock. Its hostname and boot id are
the sandbox's own already: CreateSandbox sets the one and makes the other (see the guest's
kabuto.guest.freshen), after this.
"""

from __future__ import annotations

import secrets
import time

from kabuto.agent.client import AgentClient

#: bytes of host randomness a freshened guest mixes in (its pool is 256 bytes; the CRNG key 32)
SEED_BYTES = 512


async def freshen_guest(agent: AgentClient) -> None:
    """Reseed the guest's RNG from the host's and set its clock to the host's, in that order
    (the clock last: it is read closest to the call)."""
    await agent.reseed_random_dev(secrets.token_bytes(SEED_BYTES))
    now = time.time_ns()
    await agent.set_guest_date_time(now // 1_000_000_000, now // 1000 % 1_000_000)
