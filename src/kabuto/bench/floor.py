"""The floor on this host: bare qemu-system-x86_64 booting the same kernel with a one-line initrd."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import tempfile
import time
from pathlib import Path

from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor.host import choose_accelerator
from kabuto.image.cpio import DeviceNode, write_newc

MARKER = b"KABUTO-FLOOR-UP"
BUSYBOX = "/bin/busybox"


def one_line_initrd(dest: Path, idle: bool = False) -> Path:
    """A gzip'd initramfs holding busybox and an /init of one line that prints the marker, then
    powers off (or, ``idle``, sleeps: a VM to measure the memory of)."""
    after = "/bin/busybox sleep 86400" if idle else "/bin/busybox reboot -f"
    init = f"#!/bin/busybox sh\n/bin/busybox echo {MARKER.decode()}; {after}\n"
    return pack_initrd(dest, {"init": init.encode(), "bin/busybox": Path(BUSYBOX).read_bytes()})


def pack_initrd(dest: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (all executable) with a /dev/console, which the kernel opens for init's stdio."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "dev").mkdir()
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
            (root / name).chmod(0o755)
        archive = io.BytesIO()
        write_newc(root, archive, (DeviceNode("dev/console", 5, 1),))
    dest.write_bytes(gzip.compress(archive.getvalue(), compresslevel=1))
    return dest


def bare_qemu_args(table: HypervisorConfig, kernel: str, initrd: Path, append: str) -> list[str]:
    """QEMU with only what the guest needs: same binary, machine, accelerator and memory as Kabuto's."""
    accel = choose_accelerator(table.accel).name
    return [
        table.path, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-M", table.machine_type or "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(table.default_memory), "-smp", "1",
        "-kernel", kernel, "-initrd", str(initrd), "-append", append,
    ]


async def boot_floor(table: HypervisorConfig, kernel: str, initrd: Path, timeout: float = 60.0) -> float:
    """Seconds from spawning QEMU until the one-line init prints its marker."""
    args = [*bare_qemu_args(table, kernel, initrd, "console=ttyS0 quiet panic=-1"), "-serial", "stdio"]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        seen = b""
        async with asyncio.timeout(timeout):
            while MARKER not in seen:
                chunk = await proc.stdout.read(4096)  # type: ignore[union-attr]
                if not chunk:
                    raise RuntimeError(f"bare QEMU exited before the marker; output tail: {seen[-400:]!r}")
                seen = seen[-8192:] + chunk
        return time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

