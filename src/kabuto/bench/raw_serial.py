"""A raw virtio-serial copy: the guest writes N bytes straight into a port, no agent, no ttrpc.

The guest is the same kernel and initrd Kabuto boots, with one small cpio appended (the kernel
unpacks concatenated archives in order) that holds /bench-init, selected with ``rdinit=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from kabuto.bench.floor import bare_qemu_args, pack_initrd
from kabuto.config.model import HypervisorConfig

PORT_NAME = "bench.0"

BENCH_INIT = """#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read -r module; do insmod "$module"; done < /lib/modules/boot-modules
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name)" = "{port}" ] && head -c {size} /dev/zero > /dev/${{p##*/}}
done
poweroff -f
"""


async def _connect(sock: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect once QEMU has made its socket (the caller bounds the wait)."""
    while True:
        try:
            return await asyncio.open_unix_connection(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(0.02)


def bench_initrd(base_initrd: Path, dest: Path, size: int) -> Path:
    script = BENCH_INIT.format(port=PORT_NAME, size=size).encode()
    extra = pack_initrd(dest.with_suffix(".extra"), {"bench-init": script})
    # an uncompressed base needs its archive padded to 4 bytes before the next one starts
    base = base_initrd.read_bytes()
    dest.write_bytes(base + b"\0" * (-len(base) % 4) + extra.read_bytes())
    extra.unlink()
    return dest


async def raw_copy_seconds(table: HypervisorConfig, kernel: str, initrd: Path, size: int, workdir: Path,
                           timeout: float = 300.0) -> float:
    """Seconds from the first byte to the last of ``size`` bytes read from the port."""
    sock = workdir / "bench.sock"
    args = [
        *bare_qemu_args(table, kernel, initrd, "console=ttyS0 quiet panic=-1 rdinit=/bench-init"),
        "-serial", "null",
        "-chardev", f"socket,id=bench,path={sock},server=on,wait=on",
        "-device", "virtio-serial-pci,id=vs0",
        "-device", f"virtserialport,bus=vs0.0,chardev=bench,name={PORT_NAME}",
    ]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(sock)
            received, first = 0, 0.0
            while received < size:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    raise RuntimeError(f"raw copy ended after {received} of {size} bytes")
                if not received:
                    first = time.monotonic()
                received += len(chunk)
            elapsed = time.monotonic() - first
            writer.close()
            return elapsed
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        sock.unlink(missing_ok=True)
