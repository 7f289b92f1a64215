"""The storage section of `make bench`: the QEMU backend's two shared filesystems, virtio-9p and
virtio-fs (virtiofsd), side by side on the same VM size, each against the same work on the host.

The work runs in a container on a rw bind mount of a host directory, with the rootfs's busybox;
the host runs the same busybox script in a directory of its own. One sandbox per filesystem is
booted once (both stay up throughout); each run executes the whole script once per side, the three
sides interleaved run by run. Times come from the clock of whoever does the work (busybox
``adjtimex``, microseconds), read between the steps inside the script, so neither the boot nor the
exec's agent round trip counts.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import subprocess
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import kabuto
from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import resolve_config
from kabuto.runtime.busybox import make_busybox_rootfs

Row = Callable[..., dict[str, object]]
SHARED_FS_KINDS = ("virtio-9p", "virtio-fs")
GUEST_MOUNT = "/bench"
TREE_DIRS = 10
TREE_FILES_PER_DIR = 50
TREE_MAX_FILE_SIZE = 4096
BIG_FILE_MIB = 256
TAR_MTIME = 1_700_000_000
SCRIPT_TIMEOUT = 600.0
STEPS = ("untar", "find+stat", "write", "read")
# Each `adjtimex` prints the clock (tv_sec, tv_usec): two stamps back to back (what one stamp costs:
# a process start, tens of ms in a TCG guest, ~1 ms on the host), then one after each step. Clean-up and
# a `sync` of what earlier runs left stay outside the stamps.
SCRIPT = f"""set -e
cd "$1"
rm -rf tree big
sync
adjtimex
adjtimex
mkdir tree && tar -xf tree.tar -C tree
adjtimex
find tree -exec stat -c '%n %s %Y' {{}} + >/dev/null
adjtimex
dd if=/dev/zero of=big bs=1M count={BIG_FILE_MIB} conv=fsync 2>/dev/null
adjtimex
dd if=big of=/dev/null bs=1M 2>/dev/null
adjtimex
rm -rf tree big
"""


def write_tree_tarball(dest: Path) -> Path:
    """A tar of TREE_DIRS directories of TREE_FILES_PER_DIR small files (0 to 4 KiB), the same bytes
    on every call: contents, sizes, owners and times depend only on the indices."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in range(TREE_DIRS):
            directory = tarfile.TarInfo(f"d{d:03}")
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, TAR_MTIME
            tar.addfile(directory)
            for f in range(TREE_FILES_PER_DIR):
                index = d * TREE_FILES_PER_DIR + f
                line = f"file {index} of directory {d}\n".encode()
                data = (line * (TREE_MAX_FILE_SIZE // len(line) + 1))[:index * 131 % TREE_MAX_FILE_SIZE]
                member = tarfile.TarInfo(f"d{d:03}/f{f:03}")
                member.size, member.mode, member.mtime = len(data), 0o644, TAR_MTIME
                tar.addfile(member, io.BytesIO(data))
    dest.write_bytes(archive.getvalue())
    return dest


def config_with_shared_fs(kind: str) -> str:
    """The built-in configuration with ``[hypervisor.qemu] shared_fs`` set to ``kind``."""
    text, count = re.subn(r'(?m)^shared_fs = ".*"$', f'shared_fs = "{kind}"', builtin_default_text())
    if count != 1:
        raise RuntimeError("the built-in configuration has no single shared_fs line to change")
    return text


def step_seconds(stdout: bytes) -> list[float]:
    """Each step's duration from the script's ``adjtimex`` stamps, less what a stamp costs."""
    fields = dict.fromkeys(("tv_sec", "tv_usec"), 0)
    stamps = []
    for line in stdout.decode().splitlines():
        match = re.match(r"\s*time\.(tv_sec|tv_usec):\s*(\d+)", line)
        if match:
            fields[match[1]] = int(match[2])
            if match[1] == "tv_usec":
                stamps.append(fields["tv_sec"] + fields["tv_usec"] / 1e6)
    if len(stamps) != len(STEPS) + 2:
        raise RuntimeError(f"expected {len(STEPS) + 2} clock stamps, got {len(stamps)}: {stdout[-400:]!r}")
    stamp_cost, *steps = (b - a for a, b in itertools.pairwise(stamps))
    return [step - stamp_cost for step in steps]


async def storage_section(runs: int, work: Path, row: Row) -> list[dict[str, object]]:
    # a run is ~30 s of shared-fs work under TCG: half the other sections' runs keeps `make bench` short
    runs = (runs + 1) // 2
    rootfs = make_busybox_rootfs(work / "storage-rootfs")
    sides: dict[str, Callable[[], Awaitable[list[float]]]] = {}
    sandboxes: list[kabuto.AsyncSandbox] = []
    try:
        for kind in SHARED_FS_KINDS:
            share = work / f"share-{kind}"
            share.mkdir()
            write_tree_tarball(share / "tree.tar")
            config = work / f"{kind}.toml"
            config.write_text(config_with_shared_fs(kind))
            sandbox = kabuto.AsyncSandbox(config=str(config), rootfs=rootfs, binds={GUEST_MOUNT: share})
            sandboxes.append(sandbox)
            await sandbox.start()
            sides[kind] = _in_sandbox(sandbox)
        host_share = work / "share-host"
        host_share.mkdir()
        write_tree_tarball(host_share / "tree.tar")
        sides["host"] = _on_host(rootfs, host_share)

        table = resolve_config(str(work / f"{SHARED_FS_KINDS[0]}.toml")).table
        files = TREE_DIRS * TREE_FILES_PER_DIR
        print(f"storage ({runs} runs each, interleaved; {table.default_vcpus} vCPU, "
              f"{table.default_memory} MiB, virtio-fs cache {table.virtio_fs_cache}; "
              f"{files} files, {BIG_FILE_MIB} MiB)")
        times: dict[str, list[list[float]]] = {side: [] for side in sides}
        for _ in range(runs):
            for side, measure in sides.items():
                times[side].append(await measure())
    finally:
        for sandbox in sandboxes:
            await sandbox.close()
    labels = {"untar": f"untar {files} files", "find+stat": f"find + stat {files} files",
              "write": f"write {BIG_FILE_MIB} MiB, fsync", "read": f"read {BIG_FILE_MIB} MiB back"}
    rows = []
    for index, step in enumerate(STEPS):
        host = [run[index] for run in times["host"]]
        for kind in SHARED_FS_KINDS:
            rows.append(row(f"{labels[step]}: {kind} vs host", [run[index] for run in times[kind]], host))
    return rows


def _in_sandbox(sandbox: kabuto.AsyncSandbox) -> Callable[[], Awaitable[list[float]]]:
    async def measure() -> list[float]:
        result = await sandbox.run(["sh", "-c", SCRIPT, "sh", GUEST_MOUNT], timeout=SCRIPT_TIMEOUT)
        if result.exit_code != 0:
            raise RuntimeError(f"storage script failed ({result.exit_code}): {result.stderr[-400:]!r}")
        return step_seconds(result.stdout)
    return measure


def _on_host(rootfs: Path, share: Path) -> Callable[[], Awaitable[list[float]]]:
    """The same script with the rootfs's busybox, so both sides run the same tools."""
    args = [str(rootfs / "bin" / "sh"), "-c", SCRIPT, "sh", str(share)]
    env = {"PATH": str(rootfs / "bin")}

    async def measure() -> list[float]:
        result = await asyncio.to_thread(subprocess.run, args, env=env, capture_output=True, check=True,
                                         timeout=SCRIPT_TIMEOUT)
        return step_seconds(result.stdout)
    return measure
