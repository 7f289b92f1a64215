"""Storages in the guest: the host's disks and shares, mounted where a request says."""

from __future__ import annotations

import asyncio
import logging
import os

from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.spec import MAX_PATH_LENGTH, SpecError, parse_mount_options
from kabuto.protos import containers_pb2 as pb
from kabuto.ttrpc import Code, RpcError

log = logging.getLogger(__name__)

DEVICE_WAIT = 10.0
DEVICE_POLL = 0.02
#: how the host names a disk it plugged: by the serial it gave it (virtio-blk keeps 20 bytes)
SERIAL_PREFIX = "serial:"
MAX_SERIAL = 64


async def mount_storage(storage: pb.Storage, mount_point: str) -> None:
    if not storage.source or len(storage.source) > MAX_PATH_LENGTH or "\0" in storage.source:
        raise RpcError(Code.INVALID_ARGUMENT, f"storage for {mount_point}: source must be set")
    if not storage.fstype.isalnum() or len(storage.fstype) > 16:
        raise RpcError(
            Code.INVALID_ARGUMENT, f"storage for {mount_point}: bad fstype {storage.fstype[:20]!r}"
        )
    if len(storage.options) > 64:
        raise RpcError(Code.INVALID_ARGUMENT, f"storage for {mount_point}: too many options")
    try:
        flags, propagation, data = parse_mount_options(list(storage.options), f"{mount_point} options")
    except SpecError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
    source = storage.source
    if source.startswith(SERIAL_PREFIX):
        source = await device_by_serial(source.removeprefix(SERIAL_PREFIX))
    elif source.startswith("/dev/"):
        await wait_for_device(source)
    try:
        os.makedirs(mount_point, exist_ok=True)
        await _mount(source, mount_point, storage.fstype, flags, data or None)
        if propagation:
            sc.mount(None, mount_point, None, propagation)
    except OSError as exc:
        raise RpcError(
            Code.INVALID_ARGUMENT,
            f"cannot mount {storage.source} ({storage.fstype}) on {mount_point}: {exc.strerror or exc}",
        ) from None


async def _mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2); a 9p share whose tag no device has yet (a virtio-9p device hot-plugged into a
    VM restored from a template, still being probed: ENOENT) is tried again, not forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEVICE_WAIT
    while True:
        try:
            sc.mount(source, target, fstype, flags, data)
            return
        except FileNotFoundError:
            if fstype != "9p" or loop.time() >= deadline:
                raise
        await asyncio.sleep(DEVICE_POLL)


async def wait_for_device(path: str) -> None:
    """A hot-plugged disk's node appears once the guest has probed it; not forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEVICE_WAIT
    while not _exists(path):
        if loop.time() >= deadline:
            raise RpcError(Code.NOT_FOUND, f"block device {path} did not appear within {DEVICE_WAIT:g}s")
        await asyncio.sleep(DEVICE_POLL)


async def device_by_serial(serial: str, sys_block: str = "/sys/block") -> str:
    """The disk whose serial the host set (virtio-blk's ``serial``, or a SCSI disk's unit serial
    number page): the host cannot know the name the guest gives it, so it names it by serial."""
    if not serial or len(serial) > MAX_SERIAL or "/" in serial:
        raise RpcError(Code.INVALID_ARGUMENT, f"bad disk serial {serial[:40]!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEVICE_WAIT
    while True:
        for name in _listdir(sys_block):
            if _serial_of(f"{sys_block}/{name}") == serial:
                node = f"/dev/{name}"
                await wait_for_device(node)
                return node
        if loop.time() >= deadline:
            raise RpcError(Code.NOT_FOUND, f"no disk with serial {serial!r} appeared within {DEVICE_WAIT:g}s")
        await asyncio.sleep(DEVICE_POLL)


def _serial_of(disk: str) -> str | None:
    try:
        with open(f"{disk}/serial", "rb") as file:  # virtio-blk
            return file.read(MAX_SERIAL + 1).decode(errors="replace").strip()
    except OSError:
        pass
    try:
        # SCSI: VPD page 0x80, a 4-byte header then the serial
        with open(f"{disk}/device/vpd_pg80", "rb") as file:
            return file.read(MAX_SERIAL + 5)[4:].decode(errors="replace").strip()
    except OSError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def unmount(path: str) -> None:
    try:
        sc.umount2(path, sc.MNT_DETACH)
    except OSError as exc:
        log.warning("cannot unmount %s: %s", path, exc)


def _exists(path: str) -> bool:
    return os.path.exists(path)
