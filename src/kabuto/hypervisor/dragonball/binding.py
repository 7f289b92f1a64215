"""The seam where a Python binding to Dragonball's in-process VMM would plug in.

Dragonball is a Rust library linked into Kata's runtime-rs; it has no Python binding and
cannot be built here. A binding (e.g. a PyO3 extension) implements ``DragonballBinding``
and calls ``register_binding``; until one does, the plugin reports the backend unavailable.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

UNAVAILABLE_REASON = (
    "no Python binding to Dragonball's in-process VMM: it is a Rust library linked into "
    "Kata's runtime-rs, not a separate binary Kabuto could spawn"
)


@runtime_checkable
class DragonballBinding(Protocol):
    """What the backend would call: one in-process VM per ``create_vm`` handle."""

    def create_vm(self, vm_id: str, config: dict[str, Any]) -> Any:
        """Set up a VM (vcpus, memory, kernel, cmdline, hybrid vsock path); return a handle."""

    def insert_device(self, vm: Any, kind: str, config: dict[str, Any]) -> None:
        """Cold-plug before ``start``, hot-plug after (block, network, shared-fs, vfio)."""

    def remove_device(self, vm: Any, device_id: str) -> None: ...

    def start(self, vm: Any) -> None: ...

    def pause(self, vm: Any) -> None: ...

    def resume(self, vm: Any) -> None: ...

    def stop(self, vm: Any) -> None: ...

    def vcpu_thread_ids(self, vm: Any) -> dict[int, int]: ...


_binding: DragonballBinding | None = None


def register_binding(binding: DragonballBinding | None) -> None:
    """Install (or with ``None`` remove) the binding the backend drives."""
    global _binding
    if binding is not None and not isinstance(binding, DragonballBinding):
        raise TypeError(f"{binding!r} does not implement DragonballBinding")
    _binding = binding


def current_binding() -> DragonballBinding | None:
    return _binding
