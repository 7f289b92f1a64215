"""Fixtures shared by every test directory: a VM jailer root that must be left empty."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest


def find_leftovers(root: Path) -> list[str]:
    """Processes whose command line mentions ``root`` and anything still inside ``root``.

    Every VMM backend keeps its sockets, logs and state under the jailer root, and its
    command line names them, so a VMM that outlived its test shows up here.
    """
    marker = str(root)
    found: list[str] = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(marker in arg for arg in cmdline):
            with_status = f"pid {process.info['pid']}: {' '.join(cmdline)[:200]}"
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            found.append(with_status)
    if root.exists():
        found += [f"path {p}" for p in sorted(root.rglob("*"))]
    return found


def make_jailer_root(prefix: str = "kbt-") -> Path:
    # Unix socket paths hold at most 107 bytes: pytest's tmp_path is too deep for them.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def leftover_check() -> Callable[[Path], None]:
    """``leftover_check(root)`` fails the test if a VMM process, socket or directory remains."""

    def check(root: Path) -> None:
        leftovers = find_leftovers(root)
        assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers)

    return check


@pytest.fixture
def vm_root(leftover_check: Callable[[Path], None]) -> Iterator[Path]:
    """A short, empty jailer root; the test fails if anything is left in it afterwards."""
    root = make_jailer_root()
    try:
        yield root
        leftover_check(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def module_vm_root() -> Iterator[Path]:
    """Like ``vm_root`` for a module-scoped VM: checked once the module's tests are done."""
    root = make_jailer_root()
    try:
        yield root
        leftovers = find_leftovers(root)
        assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
