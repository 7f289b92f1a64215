"""The rootfs mounts containerd hands a task (a snapshotter's overlay, say), mounted on the bundle's
rootfs directory before the runtime shares it with the VM, unmounted when the task goes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from kabuto.errors import KabutoError
from kabuto.protos import containerd_types_pb2 as types_pb
from kabuto.runtime.rootfs import mount_points

MOUNT_TIMEOUT = 30.0


class MountError(KabutoError):
    """A rootfs mount containerd asked for could not be made or undone."""


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(MOUNT_TIMEOUT):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise MountError(f"{' '.join(argv)} did not finish within {MOUNT_TIMEOUT:g}s") from None
    if process.returncode:
        raise MountError(f"{' '.join(argv)} failed: {output.decode(errors='replace').strip()[-500:]}")


async def mount_rootfs(rootfs: list[types_pb.Mount] | RepeatedCompositeFieldContainer[types_pb.Mount],
                       target: Path) -> Path | None:
    """Mount containerd's rootfs mounts on ``target`` in order; None when there are none
    (``ctr run --rootfs DIR``: the spec's root.path already names a directory)."""
    done: list[Path] = []
    try:
        for mount in rootfs:
            argv = ["mount", "-t", mount.type or "none"]
            if mount.options:
                argv += ["-o", ",".join(mount.options)]
            await _run(*argv, "--", mount.source, str(target))
            done.append(target)
    except BaseException:
        for mounted in reversed(done):
            await unmount(mounted)
        raise
    return target if done else None


async def unmount(target: Path) -> None:
    """Undo every mount on ``target`` (an overlay can sit on a bind)."""
    while str(target) in mount_points():
        await _run("umount", str(target))
