"""Shared by the reliability tests: make test's or make soak's scale, and the figures store.

Tests import from here (never from conftest: several test directories have a conftest module,
and which one `import conftest` finds depends on what pytest collected first).
"""

from __future__ import annotations

import os
from typing import Any

SOAK_ENV = "KABUTO_SOAK"
FIGURES_ENV = "KABUTO_FIGURES"

#: scenario -> figure name -> value, written at the end of the session (conftest.py)
FIGURES: dict[str, dict[str, Any]] = {}


def soak() -> bool:
    return os.environ.get(SOAK_ENV, "") not in ("", "0")


def scale(short: int, long: int) -> int:
    """``short`` in make test, ``long`` under make soak."""
    return long if soak() else short


class Figures:
    """Measurements of one scenario, keyed by name; written at the end of the session."""

    def __init__(self, scenario: str) -> None:
        self.values = FIGURES.setdefault(scenario, {})

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value
