"""The floor on this host: bare qemu-system-x86_64 booting the same kernel with a one-line initrd."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import time
from pathlib import Path

from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor.host import choose_accelerator

MARKER = b"KABUTO-FLOOR-UP"
BUSYBOX = "/bin/busybox"


def one_line_initrd(dest: Path) -> Path:
    """A gzip'd newc cpio holding busybox and an /init of one line that prints the marker."""
    init = f"#!/bin/busybox sh\n/bin/busybox echo {MARKER.decode()}; /bin/busybox reboot -f\n"
    files = {
        "init": (init.encode(), 0o755),
        "bin/busybox": (Path(BUSYBOX).read_bytes(), 0o755),
    }
    buf = io.BytesIO()
    _write_newc(buf, files)
    dest.write_bytes(gzip.compress(buf.getvalue(), compresslevel=1))
    return dest


def _write_newc(out: io.BytesIO, files: dict[str, tuple[bytes, int]]) -> None:
    # No maintained Python library writes cpio; newc is a fixed ASCII header per entry.
    # /dev/console must exist in the archive: the kernel opens it for init's stdio.
    entries = [("bin", b"", 0o040755, 0), ("dev", b"", 0o040755, 0), ("dev/console", b"", 0o020600, 1)]
    entries += [(n, data, 0o100000 | mode, 0) for n, (data, mode) in files.items()]
    for ino, (name, data, mode, rdev_minor) in enumerate([*entries, ("TRAILER!!!", b"", 0, 0)], start=1):
        encoded = name.encode() + b"\0"
        rdev_major = 5 if rdev_minor else 0
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev_major, rdev_minor, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))


async def boot_floor(table: HypervisorConfig, kernel: str, initrd: Path, timeout: float = 60.0) -> float:
    """Seconds from spawning QEMU until the one-line init prints its marker."""
    accel = choose_accelerator(table.accel).name
    args = [
        table.path, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-M", table.machine_type or "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-m", str(table.default_memory), "-smp", "1",
        "-kernel", kernel, "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        "-serial", "stdio",
    ]
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

