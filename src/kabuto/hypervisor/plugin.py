"""Hypervisor plugins: each VMM adjusts and validates its own configuration table.

As in Kata runtime-rs, a plugin is registered under a name; ``load_config`` calls its
``adjust`` (defaults, units, path resolution) and then ``validate`` on the table whose
name ``[runtime] hypervisor_name`` picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kabuto.config.model import HypervisorConfig
from kabuto.errors import Problem

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor
    from kabuto.hypervisor.capabilities import Capabilities


@dataclass
class Availability:
    """Whether this host can run a backend, and why (shown by `kabuto check`)."""

    available: bool
    reasons: list[str] = field(default_factory=list)
    binary: str = ""
    accelerator: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "available": self.available,
            "reasons": self.reasons,
            "binary": self.binary,
            "accelerator": self.accelerator,
        }


@runtime_checkable
class HypervisorPlugin(Protocol):
    """What a VMM registers. Third-party plugins implement the same protocol."""

    #: other names that select this plugin (``clh`` for ``cloud-hypervisor``)
    aliases: tuple[str, ...]

    def adjust(self, table: HypervisorConfig) -> None:
        """Fill defaults, convert units, resolve paths, in place."""

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        """Return every problem found (an empty list means valid). Keys are table-relative."""

    def capabilities(self) -> Capabilities: ...

    def availability(self, table: HypervisorConfig) -> Availability:
        """Can this host run it with this table? Must not start a VM or block."""

    def backend(self) -> type[Hypervisor]:
        """The Hypervisor class; raise HypervisorUnavailable if there is none here."""


class BasePlugin:
    """Adjust and validate rules every VMM shares; backends override the class attributes.

    Subclasses set ``default_path`` and the other class attributes and implement
    ``capabilities``, ``availability`` and ``backend``.
    """

    aliases: tuple[str, ...] = ()
    #: the binary looked up on PATH when ``path`` is empty ("" for in-process VMMs)
    default_binary: str = ""
    default_memory_mib: int = 2048
    min_memory_mib: int = 64
    default_machine_type: str = ""
    block_drivers: tuple[str, ...] = ("virtio-blk",)
    shared_fs_kinds: tuple[str, ...] = ("none",)
    kernel_param_defaults: str = ""

    def adjust(self, table: HypervisorConfig) -> None:
        from kabuto.hypervisor.host import find_binary, host_cpus

        if not table.path and self.default_binary:
            table.path = find_binary("", self.default_binary) or f"/usr/bin/{self.default_binary}"
        if table.default_vcpus <= 0:
            table.default_vcpus = 1
        cpus = host_cpus()
        if table.default_maxvcpus <= 0 or table.default_maxvcpus > cpus:
            table.default_maxvcpus = cpus
        if table.default_memory <= 0:
            table.default_memory = self.default_memory_mib
        if not table.machine_type:
            table.machine_type = self.default_machine_type
        if not table.block_device_driver:
            table.block_device_driver = self.block_drivers[0]
        if not table.shared_fs:
            table.shared_fs = self.shared_fs_kinds[0]

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        from kabuto.hypervisor.host import host_cpus

        problems: list[Problem] = []
        if self.default_binary:
            problems += check_path("path", table.path, table.valid_hypervisor_paths, executable=True)
        for key in ("kernel", "initrd", "image", "firmware", "jailer_path", "virtio_fs_daemon"):
            value = getattr(table, key)
            if value:
                problems += check_path(key, value, _valid_paths_for(table, key))
        if table.kernel and not table.initrd and not table.image:
            problems.append(Problem("initrd", "", "a kernel needs an initrd or an image"))
        if table.initrd and table.image:
            problems.append(Problem("image", table.image, "set either image or initrd, not both"))
        cpus = host_cpus()
        if table.default_vcpus < 1:
            problems.append(Problem("default_vcpus", table.default_vcpus, "must be at least 1"))
        if table.default_vcpus > table.default_maxvcpus:
            problems.append(
                Problem("default_vcpus", table.default_vcpus,
                        f"exceeds default_maxvcpus ({table.default_maxvcpus})")
            )
        if table.default_vcpus > cpus:
            problems.append(Problem("default_vcpus", table.default_vcpus, f"exceeds the host's {cpus} CPUs"))
        if table.default_memory < self.min_memory_mib:
            problems.append(
                Problem("default_memory", table.default_memory, f"below the minimum of {self.min_memory_mib} MiB")
            )
        if table.default_maxmemory and table.default_maxmemory < table.default_memory:
            problems.append(Problem("default_maxmemory", table.default_maxmemory, "below default_memory"))
        if table.memory_slots < 0:
            problems.append(Problem("memory_slots", table.memory_slots, "must not be negative"))
        if table.block_device_driver not in self.block_drivers:
            problems.append(
                Problem("block_device_driver", table.block_device_driver,
                        f"must be one of {', '.join(self.block_drivers)}")
            )
        if table.shared_fs not in self.shared_fs_kinds:
            problems.append(
                Problem("shared_fs", table.shared_fs, f"must be one of {', '.join(self.shared_fs_kinds)}")
            )
        if table.accel not in ("auto", "kvm", "tcg"):
            problems.append(Problem("accel", table.accel, "must be auto, kvm or tcg"))
        return problems


_VALID_PATHS = {
    "path": "valid_hypervisor_paths",
    "kernel": "valid_kernel_paths",
    "initrd": "valid_initrd_paths",
    "image": "valid_image_paths",
    "jailer_path": "valid_jailer_paths",
    "virtio_fs_daemon": "valid_virtio_fs_daemon_paths",
    "ctlpath": "valid_ctlpaths",
    "file_mem_backend": "valid_file_mem_backends",
    "entropy_source": "valid_entropy_sources",
    "vhost_user_store_path": "valid_vhost_user_store_paths",
}


def valid_paths_key(key: str) -> str | None:
    """The ``valid_*_paths`` list that guards ``key``, if any."""
    return _VALID_PATHS.get(key)


def _valid_paths_for(table: HypervisorConfig, key: str) -> list[str]:
    guard = valid_paths_key(key)
    return list(getattr(table, guard)) if guard else []


def path_allowed(value: str, globs: list[str]) -> bool:
    """True when ``value`` matches one of ``globs`` (an empty list allows everything)."""
    from fnmatch import fnmatchcase
    from os.path import normpath

    if not globs:
        return True
    value = normpath(value)
    return any(fnmatchcase(value, g) for g in globs)


def check_path(key: str, value: str, globs: list[str], executable: bool = False) -> list[Problem]:
    import os

    if not value:
        return [Problem(key, value, "is empty")]
    if not os.path.isabs(value):
        return [Problem(key, value, "must be an absolute path")]
    if not path_allowed(value, globs):
        return [Problem(key, value, f"does not match the allowed paths {globs}")]
    if not os.path.exists(value):
        return [Problem(key, value, "does not exist")]
    if executable and not os.access(value, os.X_OK):
        return [Problem(key, value, "is not executable")]
    return []
