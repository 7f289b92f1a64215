"""The default configuration shares a container's rootfs and bind mounts over virtio-fs (QEMU
with Debian's virtiofsd), through the CLI in a real VM: the container's root is virtiofs, and on
a read-write bind of a host directory large files, many small files, rename and unlink behave
as on the host; a read-only bind stays read-only also for a directory tree; nothing is left."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_helpers import busybox_rootfs, kabuto, require_guest_image, state_root_fixture, write_bundle

from kabuto.config.loader import builtin_default_text

pytestmark = pytest.mark.vm

LARGE_MIB = 24
SMALL_FILES = 300
SCRIPT = f"""
set -e
awk '$2 == "/" {{print "root", $3}}' /proc/mounts
cd /work
dd if=/dev/urandom of=large bs=1M count={LARGE_MIB} 2>/dev/null
sha256sum large | cut -d' ' -f1
mkdir many
i=0; while [ $i -lt {SMALL_FILES} ]; do echo "file $i" > many/f$i; i=$((i+1)); done
mv many/f0 many/renamed
rm many/f1
cat /work/from-host
if touch /ro/tree/new 2>/dev/null; then echo WROTE-RO; else echo ro-refused; fi
if echo x 2>/dev/null > /ro/tree/sub/present; then echo WROTE-RO; else echo ro-refused; fi
"""


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def test_rootfs_and_binds_over_virtio_fs(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    work = tmp_path / "work"
    work.mkdir()
    (work / "from-host").write_text("written on the host\n")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "present").write_text("kept\n")
    mounts = [
        {"destination": "/work", "type": "bind", "source": str(work), "options": ["rbind", "rw"]},
        {"destination": "/ro/tree", "type": "bind", "source": str(tree), "options": ["rbind", "ro"]},
    ]
    bundle = write_bundle(tmp_path / "bundle", rootfs, ["sh", "-c", SCRIPT],
                          change=lambda spec: spec["mounts"].extend(mounts))

    result = kabuto(state_root, "run", "--bundle", str(bundle), "vfs")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    root_line, digest, from_host, ro_file, ro_tree = result.stdout.decode().splitlines()
    assert root_line == "root virtiofs"
    assert digest == hashlib.sha256((work / "large").read_bytes()).hexdigest()
    assert (work / "large").stat().st_size == LARGE_MIB << 20
    names = {p.name for p in (work / "many").iterdir()}
    assert names == {f"f{i}" for i in range(2, SMALL_FILES)} | {"renamed"}
    assert (work / "many" / "renamed").read_text() == "file 0\n"
    assert from_host == "written on the host"
    assert (ro_file, ro_tree) == ("ro-refused", "ro-refused")
    assert sorted(p.name for p in tree.rglob("*")) == ["present", "sub"]
    assert (tree / "sub" / "present").read_text() == "kept\n"


@pytest.mark.parametrize("driver", ["virtio-blk", "virtio-scsi"])
def test_no_shared_fs_hands_the_rootfs_over_as_a_disk(state_root: Path, tmp_path: Path, driver: str) -> None:
    """``shared_fs = "none"``: the configured capabilities have no shared fs, so the rootfs goes in
    as an ext4 image on a cold-plugged disk, found in the guest by the serial the host gave it."""
    require_guest_image()
    config = tmp_path / "configuration.toml"
    config.write_text(builtin_default_text())
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-none.toml").write_text(
        f'[hypervisor.qemu]\nshared_fs = "none"\nblock_device_driver = "{driver}"\n')
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "marker").write_text("from the image\n")
    bundle = write_bundle(tmp_path / "bundle", rootfs,
                          ["sh", "-c", "awk '$2 == \"/\" {print $3}' /proc/mounts; cat /marker"])
    result = kabuto(state_root, "--config", str(config), "run", "--bundle", str(bundle), "disk")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().splitlines() == ["ext4", "from the image"]
