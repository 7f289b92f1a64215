"""A bundle's host bind mounts in a real VM, through the CLI (one boot): a host directory
read-write and a host file read-only, as CRI mounts volumes and /etc/resolv.conf."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_helpers import busybox_rootfs, kabuto, require_guest_image, state_root_fixture, write_bundle

pytestmark = pytest.mark.vm

SCRIPT = """
cat /etc/host-file
echo from-the-guest > /host-dir/written
cat /host-dir/present
if echo overwritten 2>/dev/null > /etc/host-file; then echo WROTE-RO; else echo ro-refused; fi
"""


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def test_host_dir_rw_and_host_file_ro(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "present").write_text("made on the host\n")
    host_file = tmp_path / "host-file"
    host_file.write_text("nameserver 192.0.2.53\n")
    mounts = [
        {"destination": "/host-dir", "type": "bind", "source": str(host_dir), "options": ["rbind", "rw"]},
        {"destination": "/etc/host-file", "type": "bind", "source": str(host_file),
         "options": ["rbind", "ro"]},
    ]
    bundle = write_bundle(tmp_path / "bundle", rootfs, ["sh", "-c", SCRIPT],
                          change=lambda spec: spec["mounts"].extend(mounts))

    result = kabuto(state_root, "run", "--bundle", str(bundle), "binds")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode().splitlines() == [
        "nameserver 192.0.2.53", "made on the host", "ro-refused"]
    assert (host_dir / "written").read_text() == "from-the-guest\n"
    assert host_file.read_text() == "nameserver 192.0.2.53\n"
