"""The reliability suite: short in `make test`, long under `make soak` (KABUTO_SOAK=1).

Tests record what they measured (detection times, leak counts, memory high-water marks) with
the ``figures`` fixture; with KABUTO_FIGURES=<file> set, the session writes them there as JSON
and tests/reliability/report.py turns that file into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# the runtime's integration helpers (bundles, the CLI as a process, leftover checks)
sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))
sys.path.insert(0, str(Path(__file__).parent))

from reliability_support import FIGURES, FIGURES_ENV, Figures, soak, soak_cycles


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(FIGURES_ENV)
    if not target or not FIGURES:
        return
    path = Path(target)
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.setdefault("scenarios", {}).update(FIGURES)
    old["mode"] = "soak" if soak() else "make test"
    old["soak_cycles"] = soak_cycles() if soak() else None
    old["outcome"] = f"{session.testscollected} tests, {session.testsfailed} failed"
    old["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1, sort_keys=True))


@pytest.fixture
def state_root() -> Iterator[Path]:
    from test_runtime_helpers import state_root_fixture

    yield from state_root_fixture()
