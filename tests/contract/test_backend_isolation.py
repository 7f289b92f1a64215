"""A backend never imports another backend (the shared plumbing lives in kabuto.hypervisor)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kabuto.hypervisor

BACKENDS = ("qemu", "cloud_hypervisor", "firecracker", "dragonball")
ROOT = Path(kabuto.hypervisor.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_imports_another(backend: str) -> None:
    others = tuple(f"kabuto.hypervisor.{b}" for b in BACKENDS if b != backend)
    for path in sorted((ROOT / backend).glob("*.py")):
        offending = {m for m in imported_modules(path) if m.startswith(others)}
        assert not offending, f"{path.name} imports {sorted(offending)}"
