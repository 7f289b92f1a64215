"""Making a guest that was not just booted its own: a VM restored from a template (or kept warm)
shares its RNG state, clock and kernel boot id with every other copy of it.

- entropy: the host's random bytes are credited to the pool (RNDADDENTROPY) and the CRNG is
  reseeded from it at once (RNDRESEEDCRNG), so the next read of /dev/urandom differs per clone
  (the kernel's vmgenid driver does the same when QEMU changes the generation id; this does not
  depend on it);
- clock: CLOCK_REALTIME set to the host's (the template's clock stood still while saved);
- boot id: /proc/sys/kernel/random/boot_id is the kernel's, read-only and the same in every
  clone; each sandbox gets a fresh one in a file that every container sees bind-mounted over
  it (as LXCFS serves per-container /proc files), see ``SANDBOX_BOOT_ID``.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import uuid

#: the largest ReseedRandomDev payload accepted (the kernel's pool is 256 bytes; more adds nothing)
MAX_SEED_BYTES = 4096
# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
RANDOM_DEVICE = "/dev/random"
#: where the sandbox's own boot id lives in the guest (the agent's tmpfs, never in a container)
SANDBOX_BOOT_ID = "/run/kabuto-sandbox/boot_id"
KERNEL_BOOT_ID = "/proc/sys/kernel/random/boot_id"
# the guest's clock is set to what the host says, but not to before this image could exist
MIN_EPOCH_SECONDS = 1_600_000_000


class FreshenError(ValueError):
    """The host asked for something the guest refuses (the message says what)."""


def reseed(data: bytes, device: str = RANDOM_DEVICE) -> None:
    """Mix ``data`` into the kernel's pool, credited as entropy, and reseed the CRNG now."""
    if not data:
        raise FreshenError("no random bytes to reseed with")
    if len(data) > MAX_SEED_BYTES:
        raise FreshenError(f"{len(data)} random bytes, more than {MAX_SEED_BYTES}")
    padded = data + b"\0" * (-len(data) % 4)
    # struct rand_pool_info { int entropy_count (bits); int buf_size (bytes); __u32 buf[]; }
    info = struct.pack("ii", len(data) * 8, len(data)) + padded
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def set_wall_clock(sec: int, usec: int) -> None:
    """CLOCK_REALTIME := sec.usec (bounded: a clock before 2020 or a bad usec is refused)."""
    if sec < MIN_EPOCH_SECONDS or not 0 <= usec < 1_000_000:
        raise FreshenError(f"refusing to set the clock to {sec}.{usec:06d}")
    time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1000)


def new_sandbox_boot_id(path: str = SANDBOX_BOOT_ID) -> str:
    """A fresh boot id for the sandbox, written where the containers' mounts find it. Made after
    the host's reseed (CreateSandbox comes after it), so clones of one template differ."""
    boot_id = str(uuid.UUID(bytes=os.urandom(16), version=4))
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        file.write(boot_id + "\n")
    os.chmod(temporary, 0o444)
    os.replace(temporary, path)
    return boot_id
