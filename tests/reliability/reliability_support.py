"""Shared by the reliability tests: make test's or make soak's scale, and the figures store.

Tests import from here (never from conftest: several test directories have a conftest module,
and which one `import conftest` finds depends on what pytest collected first).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

SOAK_ENV = "KABUTO_SOAK"
#: how many leak cycles per entry make soak runs (the issue's 300 unless set)
SOAK_CYCLES_ENV = "KABUTO_SOAK_CYCLES"
SOAK_CYCLES = 300
FIGURES_ENV = "KABUTO_FIGURES"

#: scenario -> figure name -> value, written at the end of the session (conftest.py)
FIGURES: dict[str, dict[str, Any]] = {}


def soak() -> bool:
    return os.environ.get(SOAK_ENV, "") not in ("", "0")


def scale(short: int, long: int) -> int:
    """``short`` in make test, ``long`` under make soak."""
    return long if soak() else short


def soak_cycles(at_least: int = 0) -> int:
    """Leak cycles per entry under make soak: KABUTO_SOAK_CYCLES (300 unless set), never fewer
    than ``at_least`` (what make test runs)."""
    return max(at_least, int(os.environ.get(SOAK_CYCLES_ENV) or SOAK_CYCLES))


class Figures:
    """Measurements of one scenario, keyed by name; written at the end of the session."""

    def __init__(self, scenario: str) -> None:
        self.values = FIGURES.setdefault(scenario, {})

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value


class LoopWatch:
    """A ticker on the host's event loop: the longest gap between its ticks shows a blocked loop."""

    def __init__(self) -> None:
        self.longest_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
