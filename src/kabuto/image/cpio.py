"""Write a directory tree as a cpio "newc" archive, the format the kernel unpacks as initramfs.

No maintained Python library writes cpio, and the format is a fixed ASCII header per entry.
Entries are written sorted, owned by root and with one fixed mtime, so the same tree always
gives the same bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
FIXED_MTIME = 0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DeviceNode:
    """A character device to create in the archive (the build does not mknod on the host)."""

    path: str
    major: int
    minor: int
    mode: int = 0o600


def _header(ino: int, mode: int, size: int, name: bytes, nlink: int = 1,
            rdev_major: int = 0, rdev_minor: int = 0) -> bytes:
    fields = (ino, mode, 0, 0, nlink, FIXED_MTIME, size, 0, 0, rdev_major, rdev_minor, len(name) + 1, 0)
    header = MAGIC + b"".join(b"%08X" % value for value in fields) + name + b"\0"
    return header + b"\0" * (-len(header) % 4)


def write_newc(root: Path, out: BinaryIO, devices: tuple[DeviceNode, ...] = ()) -> None:
    """Archive everything under ``root`` (paths relative to it), then ``devices``."""
    ino = 0
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts):
        ino += 1
        name = str(path.relative_to(root)).encode()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(path).encode()
            out.write(_header(ino, stat.S_IFLNK | 0o777, len(target), name))
            out.write(target + b"\0" * (-len(target) % 4))
        elif stat.S_ISDIR(info.st_mode):
            out.write(_header(ino, stat.S_IFDIR | stat.S_IMODE(info.st_mode), 0, name, nlink=2))
        elif stat.S_ISREG(info.st_mode):
            out.write(_header(ino, stat.S_IFREG | stat.S_IMODE(info.st_mode), info.st_size, name))
            written = 0
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            if written != info.st_size:
                raise OSError(f"{path} changed size while being archived")
            out.write(b"\0" * (-written % 4))
        else:
            raise OSError(f"{path}: only files, directories and symlinks can be archived")
    for device in devices:
        ino += 1
        out.write(_header(ino, stat.S_IFCHR | device.mode, 0, device.path.encode(),
                          rdev_major=device.major, rdev_minor=device.minor))
    out.write(_header(ino + 1, 0, 0, TRAILER.encode()))
