"""The rootfs mounts containerd hands a task (a snapshotter's overlay, say), mounted on the bundle's
rootfs directory before the runtime shares it with the VM, unmounted when the task goes."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from kabuto.protos import containerd_types_pb2 as types_pb
from kabuto.runtime.rootfs import mount_points, run_command


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
            await run_command(*argv, "--", mount.source, str(target))
            done.append(target)
    except BaseException:
        for mounted in reversed(done):
            await unmount(mounted)
        raise
    return target if done else None


async def unmount(target: Path) -> None:
    """Undo every mount on ``target`` (an overlay can sit on a bind)."""
    while str(target) in mount_points():
        await run_command("umount", str(target))
