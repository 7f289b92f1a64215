"""The import rules of docs/architecture.md, read from the source (function-level imports too).

Layers, top to bottom: cli, shim, api (and bench above them) -> runtime -> agent -> hypervisor
(core; one subpackage per VMM) -> image -> config, ttrpc -> errors, processes, protos. A module
imports its own package and the layers below; never one above or beside it. The guest runs in
the VM and imports nothing from the host side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kabuto

SRC = Path(kabuto.__file__).parent
BACKENDS = ("qemu", "cloud_hypervisor", "firecracker", "dragonball")
RANK = {
    "kabuto": 0, "errors": 0, "processes": 0, "bounded": 0, "doctables": 0, "protos": 0,
    "ttrpc": 1, "config": 1,
    "image": 2,
    "hypervisor": 3,
    "agent": 4,
    "runtime": 5,
    "api": 6, "shim": 6, "cli": 6,
    "bench": 7,
}
#: what the guest may use: its own code and the wire protocol it shares with the host
GUEST_MAY_IMPORT = {"guest", "protos", "ttrpc", "kabuto"}


def unit(module: str) -> str:
    """The layer a module belongs to; a VMM backend is a unit of its own."""
    parts = module.split(".")
    if len(parts) == 1:
        return "kabuto"
    if parts[1] == "hypervisor" and len(parts) > 2 and parts[2] in BACKENDS:
        return f"hypervisor.{parts[2]}"
    return parts[1]


def layer(name: str) -> str:
    return name.split(".")[0]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name == "kabuto" or name.startswith("kabuto.")]


def module_name(path: Path, root: Path) -> str:
    parts = ("kabuto", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` (a unit) may not import ``imported`` (a unit), or None."""
    if importer == imported:
        return None
    if layer(importer) == "guest":
        return None if layer(imported) in GUEST_MAY_IMPORT else "the guest imports nothing from the host side"
    if layer(imported) == "guest":
        return "the host side never imports the guest's code"
    if importer.startswith("hypervisor.") and imported.startswith("hypervisor."):
        return "no backend imports another"
    if imported.startswith("hypervisor.") and importer != "hypervisor":
        return "only the hypervisor registry reaches a backend (by name)"
    if imported.startswith("hypervisor.") and importer == "hypervisor":
        return "the hypervisor core never imports a backend (the registry loads them by name)"
    if importer.startswith("hypervisor.") and layer(imported) == "hypervisor":
        return None  # a backend builds on the hypervisor core
    if RANK[layer(importer)] <= RANK[layer(imported)]:
        return f"{layer(importer)} may not import {layer(imported)} (same layer or above)"
    return None


def back_arrows(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = unit(module_name(path, root))
        for line, name in imports(path):
            reason = violation(importer, unit(name))
            if reason:
                found.append(f"{path.relative_to(root.parent)}:{line}: imports {name}: {reason}")
    return found


def test_the_source_has_no_back_arrow() -> None:
    assert back_arrows(SRC) == []


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    packages |= modules | {"kabuto"}
    assert packages - set(RANK) - {"guest"} == set()


@pytest.mark.parametrize(("importer", "imported", "reason"), [
    ("config/loader.py", "kabuto.hypervisor.registry", "config may not import hypervisor"),
    ("runtime/sandbox.py", "kabuto.hypervisor.qemu.backend", "only the hypervisor registry"),
    ("shim/service.py", "kabuto.hypervisor.firecracker", "only the hypervisor registry"),
    ("cli/main.py", "kabuto.hypervisor.dragonball.backend", "only the hypervisor registry"),
    ("api.py", "kabuto.hypervisor.cloud_hypervisor.backend", "only the hypervisor registry"),
    ("hypervisor/qemu/backend.py", "kabuto.hypervisor.firecracker.plugin", "no backend imports another"),
    ("guest/service.py", "kabuto.agent.client", "the guest imports nothing from the host side"),
    ("guest/service.py", "kabuto.errors", "the guest imports nothing from the host side"),
    ("hypervisor/base.py", "kabuto.runtime.state", "hypervisor may not import runtime"),
    ("hypervisor/qemu/backend.py", "kabuto.agent.client", "hypervisor may not import agent"),
    ("agent/client.py", "kabuto.runtime.sandbox", "agent may not import runtime"),
    ("runtime/sandbox.py", "kabuto.shim.service", "runtime may not import shim"),
    ("hypervisor/registry.py", "kabuto.hypervisor.qemu.backend",
     "the hypervisor core never imports a backend"),
])
def test_a_new_back_arrow_fails(tmp_path: Path, importer: str, imported: str, reason: str) -> None:
    """The same check over a copy of the tree with one import added (at function level, where
    the old back arrows hid) finds it and names the rule."""
    copy = tmp_path / "kabuto"
    for path in SRC.rglob("*.py"):
        target = copy / path.relative_to(SRC)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    target = copy / importer
    target.write_text(target.read_text() + f"\n\ndef _added() -> None:\n    import {imported}  # noqa\n")
    arrows = back_arrows(copy)
    assert len(arrows) == 1 and reason in arrows[0], arrows
