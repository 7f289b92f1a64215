"""Boot the built guest image with QEMU and see its /init run (probe mode, no agent needed)."""

from __future__ import annotations

import shutil

import pytest
from test_runtime_helpers import bare_boot_console

from kabuto.image import build_image

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 240.0

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="the image is built from Debian packages"),
]


async def test_built_image_boots_to_init_and_its_python_imports_the_agent() -> None:
    image = await build_image()  # cached: only resolves versions when `make image` already ran
    # the probe powers the VM off
    console = await bare_boot_console(image.kernel, image.initrd, "quiet panic=-1 kabuto_probe=1",
                                      BOOT_TIMEOUT)
    assert f"KABUTO-INIT-UP {image.kernel_version}" in console, console[-3000:]
    assert "KABUTO-PROBE-OK" in console, console[-3000:]
    assert "cannot load" not in console, console[-3000:]
