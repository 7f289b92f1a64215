"""A sandbox keeps the configuration it was made with (after annotations), not the file as it
reads later: an annotation that changes a hot-plug key (block_device_driver = virtio-scsi over a
file that says virtio-blk) still decides the device that another process, attaching from the
record, hot-plugs; the guest shows which one arrived. Without the annotation the same steps give
a virtio-blk disk, so the test tells the two apart."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_helpers import (
    CLI_TIMEOUT,
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
    write_bundle,
)

from kabuto.config.loader import builtin_default_text

pytestmark = pytest.mark.vm

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
DRIVER_ANNOTATION = "io.katacontainers.config.hypervisor.block_device_driver"

# Another process (as a later CLI call or a restarted shim would be) attaches from the record and
# hot-plugs a disk; it prints nothing on success.
ATTACH_AND_PLUG = """
import asyncio, sys
from pathlib import Path
from kabuto.hypervisor.devices import BlockDevice
from kabuto.runtime.sandbox import VirtSandbox
from kabuto.runtime.state import StateStore

async def main(root: str, sandbox_id: str, disk: str) -> None:
    store = StateStore(Path(root))
    with store.sandbox_lock(sandbox_id):
        sandbox = await VirtSandbox.attach(sandbox_id, store)
        await sandbox.hypervisor.add_device(BlockDevice("attached", Path(disk)))
        await sandbox.save()
        await sandbox.hypervisor.disconnect()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def config_file(directory: Path) -> Path:
    """The built-in configuration with a drop-in: virtio-blk, and annotations may change it."""
    file = directory / "configuration.toml"
    file.write_text(builtin_default_text())
    (directory / "config.d").mkdir()
    (directory / "config.d" / "50-driver.toml").write_text(
        '[hypervisor.qemu]\nblock_device_driver = "virtio-blk"\n'
        'enable_annotations = ["default_vcpus", "default_memory", "kernel_params", "block_device_driver"]\n')
    return file


@pytest.mark.parametrize(("annotations", "disk"), [({DRIVER_ANNOTATION: "virtio-scsi"}, "sda"), ({}, "vda")],
                         ids=["annotated-virtio-scsi", "file-virtio-blk"])
def test_attach_hot_plugs_with_the_table_the_vm_booted_with(
    state_root: Path, tmp_path: Path, annotations: dict[str, str], disk: str
) -> None:
    require_guest_image()
    config = config_file(tmp_path)
    bundle = write_bundle(tmp_path / "bundle", busybox_rootfs(tmp_path / "rootfs"), SLEEPER,
                          annotations=annotations)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    kabuto(state_root, "--config", str(config), "create", "--bundle", str(bundle), "c1", check=True)
    try:
        kabuto(state_root, "start", "c1", check=True)
        # the file changes under the running sandbox: attach must not read it again
        (tmp_path / "config.d" / "50-driver.toml").write_text('[hypervisor.qemu]\nmachine_type = "pc"\n')
        plugged = subprocess.run([sys.executable, "-c", ATTACH_AND_PLUG, str(state_root), "c1", str(image)],
                                 capture_output=True, text=True, timeout=CLI_TIMEOUT)
        assert plugged.returncode == 0, plugged.stderr
        listed = kabuto(state_root, "exec", "c1", "ls", "/sys/block", check=True).stdout.decode().split()
        assert listed == [disk], listed
    finally:
        kabuto(state_root, "delete", "--force", "c1", check=True)
