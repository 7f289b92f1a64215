"""The guest image: a Debian kernel plus an initramfs with busybox, Python and Kabuto's agent as init."""

from __future__ import annotations

import importlib
from typing import Any

from kabuto.image.cache import GuestImage, installed_image
from kabuto.image.paths import boot_paths

# the builder's names load with their first use: a VM start reads the cache (the warm-start key
# too) and must not pay for the builder's imports (docs/benchmarks.md, cold start)
_BUILDER_NAMES = ("COMPRESSIONS", "DEFAULT_COMPRESSION", "DEFAULT_FLAVOUR", "KERNEL_PACKAGES", "STEPS",
                  "build_image")

__all__ = [*_BUILDER_NAMES, "GuestImage", "boot_paths", "installed_image"]


def __getattr__(name: str) -> Any:
    if name in _BUILDER_NAMES:
        return getattr(importlib.import_module("kabuto.image.builder"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
