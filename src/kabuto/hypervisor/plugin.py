"""Hypervisor plugins: each VMM adjusts and validates its own configuration table.

As in Kata runtime-rs, a plugin is registered under a name; ``kabuto.hypervisor.resolve``
calls its ``adjust`` (defaults, units, path resolution) and then ``validate`` on the table
whose name ``[runtime] hypervisor_name`` picks, and builds the backend it names.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kabuto.config.model import HypervisorConfig
from kabuto.config.rules import LOG_LEVELS, path_allowed, valid_paths_key
from kabuto.errors import ImageError, Problem

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

    def capabilities(self) -> Capabilities:
        """What the backend can do at all (``kabuto hypervisors`` shows it)."""

    def capabilities_for(self, table: HypervisorConfig) -> Capabilities:
        """What it can do as ``table`` configures it: the runtime chooses its strategies by this."""

    def availability(self, table: HypervisorConfig) -> Availability:
        """Can this host run it with this table? Must not start a VM or block."""

    def backend(self) -> type[Hypervisor]:
        """The Hypervisor class; raise HypervisorUnavailable if there is none here."""


# Kata runtime-rs's accepted values for the enumerated keys every VMM shares.
BLOCK_AIO_MODES = ("io_uring", "native", "threads")
VIRTIO_FS_CACHE_MODES = ("never", "auto", "always")
ROOTFS_DRIVERS = ("virtio-blk-pci", "virtio-blk-ccw", "virtio-blk-mmio", "virtio-pmem", "virtio-scsi")
HUGEPAGE_TYPES = ("hugetlbfs", "thp")
COLD_PLUG_VFIO = ("no-port", "root-port", "bridge-port", "switch-port")
MONITOR_SOCKETS = ("hmp", "qmp", "qmp-pretty")
ACCELERATORS = ("auto", "kvm", "tcg")
MAX_BRIDGES = 5
MAX_PCIE_PORTS = 16
#: Kata runtime-rs's bounds on msize_9p, in bytes
MIN_MSIZE_9P, MAX_MSIZE_9P = 4096, 8 * 1024 * 1024
# i32 in Kata (every other integer key is unsigned there), or checked on its own
_SIGNED_KEYS = frozenset({"hypervisor_timeout", "default_vcpus"})


class BasePlugin:
    """Adjust and validate rules every VMM shares; backends override the class attributes.

    Subclasses set ``default_binary`` and the other class attributes and implement
    ``capabilities``, ``availability`` and ``backend``. The rules follow Kata runtime-rs,
    except that out-of-range vCPU counts are reported instead of silently clamped.
    """

    aliases: tuple[str, ...] = ()
    #: the binary looked up on PATH when ``path`` is empty ("" for in-process VMMs)
    default_binary: str = ""
    default_memory_mib: int = 2048
    min_memory_mib: int = 64
    max_vcpus: int = 256
    default_machine_type: str = ""
    block_drivers: tuple[str, ...] = ("virtio-blk",)
    shared_fs_kinds: tuple[str, ...] = ("none",)
    #: the most queue pairs a virtio-net device of this VMM takes (``network_queues``)
    max_network_queues: int = 256

    def adjust(self, table: HypervisorConfig) -> None:
        from kabuto.hypervisor.host import find_binary, host_cpus

        if not table.path and self.default_binary:
            table.path = find_binary("", self.default_binary) or f"/usr/bin/{self.default_binary}"
        if not (table.kernel or table.initrd or table.image):
            fill_from_installed_image(table)
        cpus = host_cpus()
        if table.default_maxvcpus == 0 or table.default_maxvcpus > cpus:
            table.default_maxvcpus = min(cpus, self.max_vcpus)
        if table.default_memory == 0:
            table.default_memory = self.default_memory_mib
        if not table.machine_type:
            table.machine_type = self.default_machine_type
        if table.disable_block_device_use:
            table.block_device_driver = ""
        elif not table.block_device_driver:
            table.block_device_driver = self.block_drivers[0]
        if not table.shared_fs:
            table.shared_fs = self.shared_fs_kinds[0]
        if not table.entropy_source:
            table.entropy_source = "/dev/urandom"
        # Kata maps the Go runtime's "none" to "never"
        if table.virtio_fs_cache in ("", "none"):
            table.virtio_fs_cache = "never"
        if table.virtio_fs_is_dax and table.virtio_fs_cache_size == 0:
            table.virtio_fs_cache_size = 1024
        table.cpu_features = _join_list(table.cpu_features)
        table.machine_accelerators = _join_list(table.machine_accelerators)

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = _negative_numbers(table)
        problems += self._validate_paths(table)
        problems += self._validate_resources(table)
        problems += self._validate_choices(table)
        if table.network_queues > self.max_network_queues:
            problems.append(Problem("network_queues", table.network_queues, "this VMM's virtio-net takes "
                                    f"at most {self.max_network_queues} queue pair(s)"))
        return problems

    def capabilities_for(self, table: HypervisorConfig) -> Capabilities:
        return self.capabilities().configured(table)

    def _validate_paths(self, table: HypervisorConfig) -> list[Problem]:
        problems: list[Problem] = []
        if self.default_binary:
            problems += check_path("path", table.path, table.valid_hypervisor_paths, executable=True)
        optional = ["ctlpath", "kernel", "initrd", "image", "firmware", "jailer_path", "prefetch_list_path",
                    "file_mem_backend", "entropy_source"]
        if table.shared_fs in ("virtio-fs", "virtio-fs-nydus"):
            optional.append("virtio_fs_daemon")
        if table.enable_vhost_user_store:
            optional.append("vhost_user_store_path")
        for key in optional:
            value = getattr(table, key)
            if value:
                globs = _valid_paths_for(table, key)
                found = check_path(key, value, globs, executable=key == "jailer_path")
                if key in _BOOT_MEDIA:
                    found = [Problem(p.key, p.value, p.reason + _BOOT_MEDIA_HINT)
                             if p.reason == "does not exist" else p for p in found]
                problems += found
        for index, flash in enumerate(table.pflashes):
            problems += check_path(f"pflashes[{index}]", flash, [])
        if not table.kernel:
            problems.append(Problem("kernel", "", "no guest kernel: set kernel and initrd (or image), "
                                                  "or run `kabuto image build` to build the guest image"))
        elif not table.initrd and not table.image:
            problems.append(Problem("initrd", "", "a kernel needs an initrd or an image"))
        if table.initrd and table.image:
            problems.append(Problem("image", table.image, "set either image or initrd, not both"))
        if table.jailer_path and not self.capabilities().jailer:
            problems.append(Problem("jailer_path", table.jailer_path, "this hypervisor has no jailer"))
        return problems

    def _validate_resources(self, table: HypervisorConfig) -> list[Problem]:
        import psutil

        from kabuto.hypervisor.host import host_cpus

        problems: list[Problem] = []
        cpus = host_cpus()
        # shown as written: 2, not 2.0
        vcpus = int(table.default_vcpus) if float(table.default_vcpus).is_integer() else table.default_vcpus
        if vcpus <= 0:
            problems.append(Problem("default_vcpus", vcpus, "must be at least 1"))
        else:
            whole = math.ceil(vcpus)
            if whole > table.default_maxvcpus:
                problems.append(
                    Problem("default_vcpus", vcpus, f"exceeds default_maxvcpus ({table.default_maxvcpus})"))
            if whole > cpus:
                problems.append(Problem("default_vcpus", vcpus, f"exceeds the host's {cpus} CPUs"))
        if table.default_maxvcpus > self.max_vcpus:
            problems.append(Problem("default_maxvcpus", table.default_maxvcpus,
                                    f"this hypervisor supports at most {self.max_vcpus} vCPUs"))
        host_mib = psutil.virtual_memory().total // (1 << 20)
        if table.default_memory < self.min_memory_mib:
            problems.append(
                Problem("default_memory", table.default_memory,
                        f"below the minimum of {self.min_memory_mib} MiB")
            )
        elif table.default_memory > host_mib:
            problems.append(Problem("default_memory", table.default_memory,
                                    f"exceeds the host's {host_mib} MiB of RAM"))
        if table.default_maxmemory and table.default_maxmemory < table.default_memory:
            problems.append(Problem("default_maxmemory", table.default_maxmemory, "below default_memory"))
        if table.shared_fs == "virtio-9p" and not MIN_MSIZE_9P <= table.msize_9p <= MAX_MSIZE_9P:
            problems.append(Problem("msize_9p", table.msize_9p,
                                    f"must be from {MIN_MSIZE_9P} to {MAX_MSIZE_9P} bytes"))
        if table.default_bridges > MAX_BRIDGES:
            problems.append(Problem("default_bridges", table.default_bridges, f"at most {MAX_BRIDGES}"))
        for key in ("pcie_root_port", "pcie_switch_port"):
            if getattr(table, key) > MAX_PCIE_PORTS:
                problems.append(Problem(key, getattr(table, key), f"at most {MAX_PCIE_PORTS}"))
        if table.pcie_root_port and table.pcie_switch_port:
            problems.append(Problem("pcie_switch_port", table.pcie_switch_port,
                                    "set pcie_root_port or pcie_switch_port, not both"))
        logical = table.block_device_logical_sector_size
        physical = table.block_device_physical_sector_size
        for key, size in (("block_device_logical_sector_size", logical),
                          ("block_device_physical_sector_size", physical)):
            if size and not (512 <= size <= 65536 and size & (size - 1) == 0):
                problems.append(Problem(key, size, "must be 0 or a power of two from 512 to 65536"))
        if logical and physical and logical > physical:
            problems.append(Problem("block_device_logical_sector_size", logical,
                                    f"exceeds block_device_physical_sector_size ({physical})"))
        return problems

    def _validate_choices(self, table: HypervisorConfig) -> list[Problem]:
        choices: list[tuple[str, tuple[str, ...], bool]] = [
            # key, allowed values, whether "" is allowed too
            ("block_device_driver", self.block_drivers, table.disable_block_device_use),
            ("shared_fs", self.shared_fs_kinds, False),
            ("accel", ACCELERATORS, False),
            ("block_device_aio", BLOCK_AIO_MODES, True),
            ("virtio_fs_cache", VIRTIO_FS_CACHE_MODES, False),
            ("vm_rootfs_driver", ROOTFS_DRIVERS, True),
            ("hugepage_type", HUGEPAGE_TYPES, False),
            ("log_level", LOG_LEVELS, False),
            ("cold_plug_vfio", COLD_PLUG_VFIO, True),
            ("extra_monitor_socket", MONITOR_SOCKETS, True),
        ]
        problems: list[Problem] = []
        for key, allowed, empty_ok in choices:
            value = getattr(table, key)
            if value == "" and empty_ok:
                continue
            if value not in allowed:
                problems.append(Problem(key, value, f"must be one of {', '.join(allowed)}"))
        return problems


_BOOT_MEDIA = ("kernel", "initrd", "image")
# a Kata file names Kata's guest assets, which a new user of Kabuto usually does not have
_BOOT_MEDIA_HINT = " (leave kernel, initrd and image empty to boot the image `kabuto image build` installs)"


def fill_from_installed_image(table: HypervisorConfig) -> None:
    """Boot the built guest image when the table names none; never builds one."""
    try:
        from kabuto.image import installed_image

        image = installed_image()
    except (ImportError, AttributeError, ImageError):
        return
    if image is None:
        return
    table.kernel = str(image.kernel)
    table.initrd = str(image.initrd)


def _join_list(value: str) -> str:
    return ",".join(item.strip() for item in value.split(",") if item.strip())


def _negative_numbers(table: HypervisorConfig) -> list[Problem]:
    problems: list[Problem] = []
    for key in type(table).model_fields:
        value = getattr(table, key)
        if key in _SIGNED_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value < 0:
            problems.append(Problem(key, value, "must not be negative"))
    return problems


def _valid_paths_for(table: HypervisorConfig, key: str) -> list[str]:
    guard = valid_paths_key(key)
    return list(getattr(table, guard)) if guard else []


def check_path(key: str, value: str, globs: list[str], executable: bool = False) -> list[Problem]:
    """Problems with a host path from the configuration: absolute, allowed, existing."""
    if not value:
        return [Problem(key, value, "is empty")]
    if "\0" in value:
        return [Problem(key, value, "contains a NUL character")]
    if not os.path.isabs(value):
        return [Problem(key, value, "must be an absolute path")]
    if not path_allowed(value, globs):
        return [Problem(key, value, f"does not match the allowed paths {globs}")]
    if not os.path.exists(value):
        return [Problem(key, value, "does not exist")]
    if executable and not (os.path.isfile(value) and os.access(value, os.X_OK)):
        return [Problem(key, value, "is not an executable file")]
    return []
