"""Targets of the conformance suite: every registered backend, run where this host allows.

Each registered hypervisor gives a ``<name>[real]`` target, run against its real VMM when the
plugin says this host can run it and skipped with the plugin's own reason otherwise. A backend
whose VMM cannot be installed here but has an API test double in tests/contract also gives a
``<name>[api-fake]`` target: the real backend drives the fake VMM's published REST API, whose
hybrid vsock proxies to the guest agent's code run on this host (``--listen unix://``, in its own
mount and UTS namespaces), so agent and container calls go end to end through the backend's agent
channel. The fake stands in for the VMM and for the guest behind its vsock: such a row does not
test the shipped image, its /init or the agent's AF_VSOCK listener (a real guest does, in
tests/integration/test_guest_vsock.py).

Which targets exist is decided here, at collection; the fixtures are in conftest.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from kabuto.errors import ConfigError, HypervisorUnavailable
from kabuto.hypervisor import resolve_config
from kabuto.hypervisor.base import Hypervisor
from kabuto.hypervisor.registry import get_plugin, registered_names

CONTRACT_DIR = Path(__file__).resolve().parent.parent / "contract"
# The API test doubles of VMMs that cannot be installed here (see tests/contract).
API_FAKES = {
    "cloud-hypervisor": CONTRACT_DIR / "fake_clh.py",
    "firecracker": CONTRACT_DIR / "fake_firecracker.py",
}
FAKE_VIRTIOFSD = CONTRACT_DIR / "fake_virtiofsd.py"


@dataclass(frozen=True)
class Target:
    """One backend as the suite runs it: against the real VMM or against its API fake."""

    name: str
    fake_vmm: Path | None = None
    skip_reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}[{'api-fake' if self.fake_vmm else 'real'}]"


def _problems_text(exc: ConfigError) -> str:
    return str(exc).replace("\n", "; ")


def _real_target(name: str) -> Target:
    """The backend against its real VMM, or why this host cannot run it (the plugin says)."""
    plugin = get_plugin(name)
    try:
        plugin.backend()
        table = resolve_config(None, hypervisor_name=name, validate=False).config.active_hypervisor
    except (HypervisorUnavailable, ConfigError) as exc:
        return Target(name, skip_reason=_problems_text(exc) if isinstance(exc, ConfigError) else str(exc))
    availability = plugin.availability(table)
    if not availability.available:
        return Target(name, skip_reason=f"{name}: " + "; ".join(availability.reasons))
    problems = plugin.validate(table)
    if problems:
        reasons = "; ".join(f"{p.key} = {p.value!r}: {p.reason}" for p in problems)
        return Target(name, skip_reason=f"{name}: {reasons}")
    return Target(name)


def discover_targets() -> list[Target]:
    targets: list[Target] = []
    for name in registered_names():
        targets.append(_real_target(name))
        if name in API_FAKES:
            targets.append(Target(name, fake_vmm=API_FAKES[name]))
    return targets


TARGETS = discover_targets()


def _shared_test_helpers() -> ModuleType:
    """tests/conftest.py's leftover helpers (a second module named conftest cannot be imported)."""
    path = CONTRACT_DIR.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("kabuto_tests_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _shared_test_helpers()
find_leftovers = _helpers.find_leftovers
make_jailer_root = _helpers.make_jailer_root


@dataclass
class Lifecycle:
    """The shared VM of one target and what the fixture saw while bringing it up."""

    target: Target
    vm: Hypervisor
    root: Path
    host_scratch: Path
    guest_scratch: str
    observed: dict[str, object] = field(default_factory=dict)
