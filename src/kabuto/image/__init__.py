"""The guest image: a Debian kernel plus an initramfs with busybox, Python and Kabuto's agent as init."""

from kabuto.image.builder import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_FLAVOUR,
    KERNEL_PACKAGES,
    STEPS,
    build_image,
)
from kabuto.image.cache import GuestImage, installed_image
from kabuto.image.paths import boot_paths

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "DEFAULT_FLAVOUR",
    "KERNEL_PACKAGES",
    "STEPS",
    "GuestImage",
    "boot_paths",
    "build_image",
    "installed_image",
]
