"""Boot the built guest image with QEMU and see its /init run (probe mode, no agent needed)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import pytest

from kabuto.hypervisor.host import choose_accelerator
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
    accel = choose_accelerator("auto").name
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",  # type: ignore[arg-type]
        "-M", "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-m", "512",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet panic=-1 kabuto_probe=1", "-serial", "stdio",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(BOOT_TIMEOUT):
            output, _ = await proc.communicate()  # the probe powers the VM off
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    console = output.decode(errors="replace")
    assert f"KABUTO-INIT-UP {image.kernel_version}" in console, console[-3000:]
    assert "KABUTO-PROBE-OK" in console, console[-3000:]
    assert "cannot load" not in console, console[-3000:]
