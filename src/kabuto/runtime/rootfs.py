"""Getting a container's rootfs into the guest, chosen by what the backend can do.

* With a shared filesystem (virtio-9p / virtio-fs): one share per sandbox exports
  ``<sandbox>/shared``; each container's rootfs is bind-mounted at ``shared/<cid>/rootfs``, so
  one device serves the whole pod and containers added after boot need no hot-plug. The host
  paths its config.json bind-mounts go the same way, to ``shared/<cid>/mounts/<index>/<name>``.
* Without one (Firecracker): the rootfs is copied into an ext4 image (``mkfs.ext4 -d``) and
  handed over as a block device, before boot or hot-plugged after where that is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kabuto.errors import KabutoError
from kabuto.runtime.bundle import HostBind

log = logging.getLogger(__name__)

SHARE_TAG = "kabuto-shared"
# Where the guest mounts the sandbox share (the guest agent mounts the storage here).
GUEST_SHARE_DIR = "/run/kabuto/shared"
GUEST_BLOCK_DIR = "/run/kabuto/rootfs"
COMMAND_TIMEOUT = 120.0
# ext4 metadata and slack on top of the files' own size
IMAGE_OVERHEAD_BYTES = 32 * 1024 * 1024
IMAGE_SLACK = 1.25


class RootfsError(KabutoError):
    """A rootfs could not be prepared for the guest (or released again)."""


@dataclass
class Storage:
    """What the guest mounts: the same fields as the agent's Storage message."""

    source: str
    mount_point: str
    fstype: str
    options: tuple[str, ...] = ()


async def run_command(*argv: str, timeout: float = COMMAND_TIMEOUT) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise RootfsError(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RootfsError(f"{' '.join(argv)} did not finish within {timeout:g}s") from None
    if process.returncode:
        tail = output.decode(errors="replace").strip()[-500:]
        raise RootfsError(f"{' '.join(argv)} failed (exit {process.returncode}): {tail}")


# -- shared filesystem -------------------------------------------------------------------------
def share_path(shared_dir: Path, container_id: str) -> Path:
    return shared_dir / container_id / "rootfs"


async def share_rootfs(shared_dir: Path, container_id: str, rootfs: Path) -> str:
    """Bind-mount ``rootfs`` under the sandbox share; return where the guest sees it (below the
    share's own mount, so the container needs no storage of its own)."""
    target = share_path(shared_dir, container_id)
    target.mkdir(parents=True, exist_ok=False)
    try:
        await run_command("mount", "--bind", str(rootfs), str(target))
    except BaseException:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise
    return f"{GUEST_SHARE_DIR}/{container_id}/rootfs"


def binds_path(shared_dir: Path, container_id: str) -> Path:
    return shared_dir / container_id / "mounts"


def bind_name(source: Path) -> str:
    """The share's mount point for ``source`` keeps its name, so the guest's mountinfo shows the
    bind's root ending as the source does (``.../mounts/7/etc`` for ``/etc``), as runc's does."""
    return source.name or "root"


async def share_binds(shared_dir: Path, container_id: str, binds: list[HostBind]) -> dict[int, str]:
    """Bind-mount each host source at ``mounts/<index>/<name>`` beside the container's rootfs
    share; return index -> guest path. What a failure leaves is ``unshare_container``'s to undo.

    The guest is untrusted, so a read-only bind is read-only on the host side too (every mount
    of an rbind's tree) and private (no writable mount propagates into it later). Every copy is
    cut off from sending propagation back: unmounting it must never unmount the host's own.
    """
    directory = binds_path(shared_dir, container_id)
    directory.mkdir(parents=True, exist_ok=True)
    guest_paths: dict[int, str] = {}
    for bind in binds:
        (directory / str(bind.index)).mkdir()
        target = directory / str(bind.index) / bind_name(bind.source)
        if bind.source.is_dir():
            target.mkdir()
        else:  # a file (or socket, fifo...) is bind-mounted over an empty file
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        await run_command("mount", "--rbind" if bind.recursive else "--bind", str(bind.source), str(target))
        await run_command("mount", "--make-rprivate" if bind.readonly else "--make-rslave", str(target))
        if bind.readonly:
            # mount(8) keeps the mount's other flags (nosuid...) on a bind remount
            for mount_point in sorted(_mounts_at_or_below(target)):
                await run_command("mount", "-o", "remount,bind,ro", mount_point)
        guest_paths[bind.index] = f"{GUEST_SHARE_DIR}/{container_id}/mounts/{bind.index}/{target.name}"
    return guest_paths


def _mounts_at_or_below(path: Path) -> set[str]:
    return {p for p in mount_points() if p == str(path) or p.startswith(f"{path}/")}


async def unshare_container(shared_dir: Path, container_id: str) -> None:
    """Undo ``share_rootfs`` and ``share_binds``: unmount, then remove the emptied mount points
    (never recursively: a path still mounted refuses removal instead of losing host files)."""
    binds = binds_path(shared_dir, container_id)
    for index in list_dir(binds):
        for target in list_dir(index):
            await _unmount(target)
            with contextlib.suppress(OSError):
                if target.is_dir():
                    target.rmdir()
                else:
                    target.unlink()
        _remove_dirs(index)
    rootfs = share_path(shared_dir, container_id)
    await _unmount(rootfs)
    _remove_dirs(rootfs, binds, shared_dir / container_id)


async def _unmount(target: Path) -> None:
    """Unmount ``target`` and whatever is mounted below it; lazily detach if something holds it."""
    if _is_mount(target):
        try:
            await run_command("umount", "--recursive", str(target))
        except RootfsError:
            await run_command("umount", "--lazy", str(target))


def _is_mount(path: Path) -> bool:
    # os.path.ismount misses a bind mount from the same filesystem: ask the kernel's table
    return str(path) in mount_points()


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        return {_unescape(line.split()[4]) for line in mountinfo if line.strip()}


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _remove_dirs(*directories: Path) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def remove_files(*files: Path) -> None:
    for file in files:
        file.unlink(missing_ok=True)


def list_dir(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def sandbox_share_storage(fs_kind: str, msize_9p: int) -> Storage:
    """The sandbox-wide share as the guest mounts it (by its mount tag); ``msize_9p``: the largest
    9p message, in bytes (the guest kernel lowers it to what virtio carries)."""
    if fs_kind == "virtio-fs":
        return Storage(source=SHARE_TAG, mount_point=GUEST_SHARE_DIR, fstype="virtiofs")
    return Storage(source=SHARE_TAG, mount_point=GUEST_SHARE_DIR, fstype="9p",
                   options=("trans=virtio", "version=9p2000.L", "cache=mmap", f"msize={msize_9p}"))


# -- block device ------------------------------------------------------------------------------
def _tree_size(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


async def build_ext4_image(rootfs: Path, image: Path) -> None:
    """Copy ``rootfs`` into a fresh ext4 image file (e2fsprogs' ``mkfs.ext4 -d``)."""
    if shutil.which("mkfs.ext4") is None:
        raise RootfsError("mkfs.ext4 not found: install e2fsprogs to hand rootfs over as a block device")
    size = int(await asyncio.to_thread(_tree_size, rootfs) * IMAGE_SLACK) + IMAGE_OVERHEAD_BYTES
    try:
        with image.open("wb") as file:
            file.truncate(size)
        await run_command("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(rootfs), str(image))
    except BaseException:
        remove_files(image)
        raise


def block_storage(guest_address: str, container_id: str, readonly: bool) -> Storage:
    return Storage(source=guest_address, mount_point=f"{GUEST_BLOCK_DIR}/{container_id}", fstype="ext4",
                   options=("ro",) if readonly else ())
