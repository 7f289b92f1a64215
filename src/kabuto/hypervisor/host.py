"""Facts about this host that several backends need: CPUs, binaries, usable acceleration."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

SYS_MODULE = Path("/sys/module")
DEV_KVM = Path("/dev/kvm")


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    reason: str


def host_cpus() -> int:
    return len(os.sched_getaffinity(0))


def find_binary(path: str, *candidates: str) -> str:
    """An absolute path for ``path`` (or the first candidate found on PATH), or ''."""
    for item in (path, *candidates):
        if not item:
            continue
        if os.path.isabs(item):
            if os.access(item, os.X_OK):
                return item
            continue
        found = shutil.which(item)
        if found:
            return found
    return ""


def kvm_usability(sys_module: Path = SYS_MODULE, dev_kvm: Path = DEV_KVM) -> Accelerator:
    """Decide without starting a VM whether KVM runs ordinary guests here.

    A /dev/kvm backed by PVM (``kvm_pvm``) only runs PVM-enabled guest kernels: ordinary
    kernels hang, so it counts as unusable and TCG is chosen instead.
    """
    if not dev_kvm.exists():
        return Accelerator("tcg", f"{dev_kvm} does not exist")
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return Accelerator("tcg", f"{dev_kvm} is not readable and writable by this user")
    if (sys_module / "kvm_pvm").exists():
        return Accelerator("tcg", f"{dev_kvm} is backed by PVM (kvm_pvm), which hangs ordinary guest kernels")
    for vendor in ("kvm_intel", "kvm_amd"):
        if (sys_module / vendor).exists():
            return Accelerator("kvm", f"{dev_kvm} is usable ({vendor})")
    return Accelerator("tcg", f"{dev_kvm} exists but neither kvm_intel nor kvm_amd is loaded")


def choose_accelerator(requested: str) -> Accelerator:
    """``auto`` picks KVM only where it runs ordinary guests; ``kvm``/``tcg`` are taken as asked."""
    if requested in ("", "auto"):
        return kvm_usability()
    return Accelerator(requested, f"accel = {requested!r} in the configuration")
