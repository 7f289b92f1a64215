"""Kata's stock runtime-rs QEMU file runs a container here, with only its host paths changed.

The file is the generated fixture (tests/fixtures/kata/configuration-qemu-runtime-rs.toml) copied
as it is; a drop-in in its config.d/ does what an operator of this machine would: Kata's guest
assets give way to the image `kabuto image build` installs (kernel, image and initrd empty) and
virtiofsd is Debian's. Debian's QEMU is where the stock file looks for it already. The container
sees what the file asked for: its root on virtio-fs, the file's 2048 MiB and one vCPU, its kernel
parameters.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_helpers import kabuto, require_guest_image, state_root_fixture

pytestmark = pytest.mark.vm

STOCK = Path(__file__).parents[1] / "fixtures" / "kata" / "configuration-qemu-runtime-rs.toml"
DEBIAN_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
DROPIN = f"""\
[hypervisor.qemu]
kernel = ""
image = ""
initrd = ""
virtio_fs_daemon = "{DEBIAN_VIRTIOFSD}"
valid_virtio_fs_daemon_paths = ["{DEBIAN_VIRTIOFSD}"]
"""
SCRIPT = """
awk '$2 == "/" {print "root", $3}' /proc/mounts
awk '/^MemTotal:/ {print "mem", $2}' /proc/meminfo
echo cpus "$(grep -c ^processor /proc/cpuinfo)"
cat /proc/cmdline
"""


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def test_stock_qemu_file_runs_a_container_on_virtio_fs(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    assert Path(DEBIAN_VIRTIOFSD).is_file(), "Debian's qemu-system-common installs virtiofsd there"
    config = tmp_path / "configuration-qemu-runtime-rs.toml"
    shutil.copyfile(STOCK, config)
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-this-host.toml").write_text(DROPIN)

    result = kabuto(state_root, "--config", str(config), "run", "--busybox", "--", "sh", "-c", SCRIPT)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    root, mem, cpus, cmdline = result.stdout.decode().splitlines()
    assert root == "root virtiofs"
    # the file's default_memory = 2048 (MiB), less what the guest kernel keeps for itself
    assert 1800 * 1024 < int(mem.split()[1]) <= 2048 * 1024
    assert cpus == "cpus 1"
    assert "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1" in cmdline
    # the stock file's warnings reach the user, each key once
    stderr = result.stderr.decode(errors="replace")
    for key in ("overhead_vcpus", "overhead_memory", "queue_size", "num_queues"):
        assert stderr.count(f"hypervisor.qemu.{key} = ") == 1, stderr
