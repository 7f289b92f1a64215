"""Pick the guest's kernel modules out of a Debian kernel package, with their dependencies."""

from __future__ import annotations

import shutil
from pathlib import Path

from kabuto.errors import ImageError
from kabuto.image.elf import module_info

# Drivers /init loads at boot, in this order: both virtio transports (PCI on q35/pc, MMIO on
# microvm), then the device drivers a sandbox uses. A driver must be loaded before its device
# is hot-plugged: nothing in the guest loads modules on device events.
BOOT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",  # the agent's virtio-serial port
    "virtio_blk",  # block rootfs fallback and hot-plugged disks
    "virtio_net",
    "9pnet_virtio",  # registers virtio-9p mount tags
    "vmw_vsock_virtio_transport",  # vsock agent channel where the host has vhost-vsock
    "virtio_rng",
)
# Loaded on demand by the kernel through /sbin/modprobe, under these aliases (a mount of type
# 9p asks for fs-9p; ext4's checksums ask for crypto-crc32c).
ON_DEMAND_ALIASES = {
    "9p": "fs-9p",
    "ext4": "fs-ext4",
    "crc32c_generic": "crypto-crc32c",
    "overlay": "fs-overlay",
}
ON_DEMAND_MODULES = tuple(ON_DEMAND_ALIASES)
# Features a kernel flavour may lack (Debian's cloud kernel has no 9p): the image records them
# as missing instead of failing, and the runtime picks another way (a block device rootfs).
OPTIONAL_MODULES = ("9pnet_virtio", "9p", "vmw_vsock_virtio_transport", "virtio_rng")


def normalise(name: str) -> str:
    return name.replace("-", "_")


def index_modules(kernel_dir: Path) -> dict[str, Path]:
    """Module name -> .ko path under ``lib/modules/<version>``."""
    return {normalise(ko.name.removesuffix(".ko")): ko for ko in kernel_dir.rglob("*.ko")}


def builtin_modules(kernel_dir: Path) -> set[str]:
    listing = kernel_dir / "modules.builtin"
    if not listing.is_file():
        return set()
    return {normalise(Path(line).name.removesuffix(".ko")) for line in listing.read_text().split()}


def load_order(wanted: tuple[str, ...], kernel_dir: Path) -> list[Path]:
    """The .ko files for ``wanted`` and everything they depend on, dependencies first.

    Modules the kernel has built in are skipped; a module that is neither built in nor
    shipped is an error naming it, since the guest would miss a feature silently.
    """
    available = index_modules(kernel_dir)
    builtin = builtin_modules(kernel_dir)
    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = normalise(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ImageError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        ko = available.get(name)
        if ko is None:
            raise ImageError(f"kernel module {name!r} (needed by {chain[-1] if chain else 'the guest'}) "
                             f"is neither built into nor shipped with the kernel in {kernel_dir}")
        for dependencies in module_info(ko).get("depends", []):
            for dependency in filter(None, dependencies.split(",")):
                visit(dependency, (*chain, name))
        seen.add(name)
        ordered.append(ko)

    for name in wanted:
        visit(name, ())
    return ordered


def copy_modules(modules: list[Path], kernel_dir: Path, dest_dir: Path) -> None:
    """Copy the chosen modules into ``dest_dir`` (the guest's lib/modules/<version>)."""
    for ko in modules:
        target = dest_dir / ko.relative_to(kernel_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ko, target)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel_dir / name).is_file():
            shutil.copy2(kernel_dir / name, dest_dir / name)
