"""Real QEMU guests (TCG here): boot to the agent, pause, hot-plug, save/restore, stop, failures.

One VM is booted per module and shared by the tests that do not end it; the guest image is
the one `kabuto image build` installed (`make test` builds it first).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from kabuto.agent.client import AgentClient, GuestDetails, wait_for_agent
from kabuto.config.model import HypervisorConfig
from kabuto.errors import AgentError, HypervisorError, VmTimeout
from kabuto.hypervisor import new_hypervisor, resolve_config
from kabuto.hypervisor.base import HypervisorState, VmStatus
from kabuto.hypervisor.devices import BlockDevice, NetworkDevice, SharedFsDevice, SharedFsKind
from kabuto.hypervisor.qemu.backend import QemuHypervisor

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

BOOT_TIMEOUT = 120.0
AGENT_TIMEOUT = 60.0
# a paused guest must not answer within this
PAUSED_CHECK_TIMEOUT = 1.0
PAUSE_SECONDS = 3.0
# Kata's default seccompsandbox
KATA_SECCOMP_SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


def qemu_table() -> HypervisorConfig:
    """The [hypervisor.qemu] table as `kabuto` would use it: built-in config plus the built image."""
    return resolve_config(None, hypervisor_name="qemu").table.model_copy(deep=True)


def share_device(root: Path) -> SharedFsDevice:
    """A cold-plugged virtio-9p export (the saved state carries it, so a clone needs it too)."""
    return SharedFsDevice("share0", SharedFsKind.VIRTIO_9P, root, "kabuto-share", read_only=True)


async def guest_details(vm: QemuHypervisor) -> GuestDetails:
    async with await wait_for_agent(await vm.get_agent_socket(), AGENT_TIMEOUT) as agent:
        return await agent.guest_details()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(module_vm_root: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[QemuHypervisor]:
    resolved = resolve_config(None, hypervisor_name="qemu")
    # the 9p share below: a virtio-fs one (vhost-user) would block save_vm's migration
    resolved.table.shared_fs = "virtio-9p"
    hypervisor = new_hypervisor(resolved, jailer_root=module_vm_root)
    assert isinstance(hypervisor, QemuHypervisor)
    await hypervisor.prepare_vm("shared")
    await hypervisor.add_device(share_device(tmp_path_factory.mktemp("share")))
    try:
        await hypervisor.start_vm(BOOT_TIMEOUT)
        yield hypervisor
        await hypervisor.stop_vm()
    finally:
        await hypervisor.cleanup()


async def test_boot_and_agent_health(vm: QemuHypervisor) -> None:
    assert vm.status == VmStatus.RUNNING
    address = await vm.get_agent_socket()
    assert address == f"unix://{vm.vm_path}/agent.sock"
    async with await wait_for_agent(address, AGENT_TIMEOUT) as agent:
        assert await agent.check()
        details = await agent.guest_details()
    assert details.is_init
    assert details.machine == "x86_64"
    assert details.kernel_release
    assert details.online_cpus == int(vm.config.default_vcpus)
    # MemTotal is RAM minus what the kernel reserved for itself
    assert 0.8 * vm.config.default_memory < details.mem_total_bytes / 2**20 <= vm.config.default_memory


async def test_pids_and_vcpu_threads(vm: QemuHypervisor) -> None:
    (pid,) = await vm.get_pids()
    qemu = psutil.Process(pid)
    assert Path(qemu.exe()).name.startswith("qemu-system")
    threads = await vm.get_thread_ids()
    assert sorted(threads.vcpus) == list(range(int(vm.config.default_vcpus)))
    qemu_threads = {t.id for t in qemu.threads()}
    assert set(threads.vcpus.values()) <= qemu_threads
    assert pid not in threads.vcpus.values()


async def test_pause_stops_the_guest_and_resume_continues(vm: QemuHypervisor) -> None:
    before = (await guest_details(vm)).uptime_seconds
    wall_start = time.monotonic()
    await vm.pause_vm()
    assert vm.status == VmStatus.PAUSED
    agent = await AgentClient.connect(await vm.get_agent_socket(), AGENT_TIMEOUT)
    try:
        with pytest.raises(AgentError):
            await agent.check(timeout=PAUSED_CHECK_TIMEOUT)
    finally:
        await agent.close()
    await asyncio.sleep(PAUSE_SECONDS)
    with pytest.raises(HypervisorError, match="cannot pause"):
        await vm.pause_vm()
    await vm.resume_vm()
    assert vm.status == VmStatus.RUNNING
    after = (await guest_details(vm)).uptime_seconds
    wall = time.monotonic() - wall_start
    # the guest's clock skipped the paused seconds
    assert after - before < wall - PAUSE_SECONDS * 0.8


async def _virtio_driver_ready(vm: QemuHypervisor, device_id: str) -> bool:
    """True once the guest's driver set DRIVER_OK on the device: the guest found and bound it."""
    path = f"/machine/peripheral/{device_id}/virtio-backend"
    status = await vm.qmp("x-query-virtio-status", {"path": path})
    return any("DRIVER_OK" in s for s in status["status"]["statuses"])


async def _virtio_paths(vm: QemuHypervisor) -> list[str]:
    return [d["path"] for d in await vm.qmp("x-query-virtio")]


async def test_cold_plugged_9p_share_is_bound_by_the_guest(vm: QemuHypervisor) -> None:
    assert [d.id for d in vm.devices if isinstance(d, SharedFsDevice)] == ["share0"]
    assert not vm.pending_devices
    assert await _virtio_driver_ready(vm, "share0")


async def test_hotplug_block_device_appears_and_goes(vm: QemuHypervisor, tmp_path: Path) -> None:
    image = tmp_path / "hotplug.img"
    image.write_bytes(b"\0" * (8 * 2**20))
    disk = BlockDevice("hpdisk0", image)
    await vm.add_device(disk)
    assert disk.guest_address == "serial:hpdisk0"
    async with asyncio.timeout(30):
        while True:
            if await _virtio_driver_ready(vm, "hpdisk0"):
                break
            await asyncio.sleep(0.2)
    nodes = [n["node-name"] for n in await vm.qmp("query-named-block-nodes")]
    assert "drive-hpdisk0" in nodes
    with pytest.raises(HypervisorError, match="no device with id"):
        await vm.remove_device(BlockDevice("not-plugged", image))
    # returns only after the guest released the device (DEVICE_DELETED)
    await vm.remove_device(disk)
    assert "/machine/peripheral/hpdisk0/virtio-backend" not in await _virtio_paths(vm)
    assert "drive-hpdisk0" not in [n["node-name"] for n in await vm.qmp("query-named-block-nodes")]
    assert disk not in vm.devices
    # the slot is free again
    await vm.add_device(disk)
    await vm.remove_device(disk)


@pytest.fixture
def tap() -> Iterator[str]:
    name = f"kbt{secrets.token_hex(4)}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, timeout=10)


async def test_hotplug_network_device_appears_and_goes(vm: QemuHypervisor, tap: str) -> None:
    nic = NetworkDevice("hpnet0", tap_name=tap, mac="02:6b:62:00:00:01")
    await vm.add_device(nic)
    async with asyncio.timeout(30):
        while True:
            if await _virtio_driver_ready(vm, "hpnet0"):
                break
            await asyncio.sleep(0.2)
    network = await vm.qmp("human-monitor-command", {"command-line": "info network"})
    assert f"ifname={tap}" in network and "02:6b:62:00:00:01" in network
    await vm.remove_device(nic)
    assert "/machine/peripheral/hpnet0/virtio-backend" not in await _virtio_paths(vm)
    assert tap not in await vm.qmp("human-monitor-command", {"command-line": "info network"})


async def test_save_restore_round_trip_and_state_for_another_process(
    vm: QemuHypervisor, module_vm_root: Path
) -> None:
    original = await guest_details(vm)
    saved = await vm.save_vm()
    assert vm.status == VmStatus.PAUSED
    assert saved.parent == vm.vm_path and saved.stat().st_size > 0

    # the clone runs under QEMU's seccomp sandbox, which forbids spawning: the state comes in
    # through a passed fd, not an `exec:` helper
    sandboxed = vm.config.model_copy(update={"seccomp_sandbox": KATA_SECCOMP_SANDBOX})
    clone = QemuHypervisor(sandboxed, jailer_root=module_vm_root)
    await clone.prepare_vm("clone")
    (share,) = (d for d in vm.devices if isinstance(d, SharedFsDevice))
    await clone.add_device(share_device(share.host_path))
    try:
        await clone.start_vm(BOOT_TIMEOUT, restore_from=saved)
        assert clone.status == VmStatus.RUNNING
        restored = await guest_details(clone)
        # the same guest carried on: the agent was not restarted, its clock went on
        assert restored.agent_started_uptime_seconds == original.agent_started_uptime_seconds
        assert restored.uptime_seconds >= original.uptime_seconds
        assert restored.kernel_release == original.kernel_release

        # another process finds the clone from the saved state, drives and stops it
        state = HypervisorState.from_dict(json.loads(json.dumps((await clone.save_state()).to_dict())))
        (clone_pid,) = state.pids
        assert KATA_SECCOMP_SANDBOX in psutil.Process(clone_pid).cmdline()
        await clone.disconnect()
        again = await QemuHypervisor.restore(state)
        assert again.config == sandboxed
        assert again.status == VmStatus.RUNNING
        assert await again.get_pids() == [clone_pid]
        await again.pause_vm()
        await again.resume_vm()
        await again.stop_vm()
        assert again.status == VmStatus.STOPPED
        assert not psutil.pid_exists(clone_pid) or psutil.Process(clone_pid).status() == psutil.STATUS_ZOMBIE
        await again.cleanup()
        await again.cleanup()
        assert not (module_vm_root / "clone").exists()
    finally:
        await clone.cleanup()

    # the source can carry on after saving
    await vm.resume_vm()
    assert (await guest_details(vm)).uptime_seconds >= original.uptime_seconds


async def test_stop_and_cleanup_leave_nothing(vm_root: Path) -> None:
    vm = QemuHypervisor(qemu_table(), jailer_root=vm_root)
    await vm.prepare_vm("stopme")
    await vm.start_vm(BOOT_TIMEOUT)
    (pid,) = await vm.get_pids()
    await vm.stop_vm()
    assert vm.status == VmStatus.STOPPED
    assert await vm.get_pids() == []
    await vm.cleanup()
    await vm.cleanup()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # vm_root's teardown asserts that no process, socket or directory is left


async def test_qemu_dying_under_a_hot_plug_is_named(vm_root: Path) -> None:
    """qemu.qmp reports a QEMU that ended mid-call as "Disconnected": the error says how it ended."""
    vm = QemuHypervisor(qemu_table(), jailer_root=vm_root)
    await vm.prepare_vm("diesunder")
    try:
        await vm.start_vm(BOOT_TIMEOUT)
        (pid,) = await vm.get_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(HypervisorError, match=r"QMP .* failed: .*QEMU was killed by signal 9"):
            await vm.resize_vcpu(1, 2)
    finally:
        await vm.cleanup()


async def test_garbage_kernel_fails_clearly(vm_root: Path, tmp_path: Path,
                                            leftover_check: Callable[[Path], None]) -> None:
    table = qemu_table()
    garbage = tmp_path / "vmlinuz"
    garbage.write_bytes(b"this is not a kernel\n" * 1000)
    table.kernel = str(garbage)
    vm = QemuHypervisor(table, jailer_root=vm_root)
    await vm.prepare_vm("garbage")
    with pytest.raises(HypervisorError, match="QEMU stderr") as failure:
        await vm.start_vm(timeout=30)
    assert not isinstance(failure.value, VmTimeout)
    assert vm.status == VmStatus.STOPPED
    leftover_check(vm_root)


async def test_panicking_guest_fails_with_its_console(vm_root: Path, tmp_path: Path,
                                                      leftover_check: Callable[[Path], None]) -> None:
    table = qemu_table()
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x1f\x8b garbage, not an initramfs" * 100)
    table.initrd = str(initrd)
    vm = QemuHypervisor(table, jailer_root=vm_root)
    await vm.prepare_vm("panic")
    with pytest.raises(HypervisorError, match=r"(?s)QEMU exited.*before the guest agent.*Kernel panic"):
        await vm.start_vm(timeout=BOOT_TIMEOUT)
    leftover_check(vm_root)


async def test_boot_timeout_kills_and_cleans(vm_root: Path, leftover_check: Callable[[Path], None]) -> None:
    vm = QemuHypervisor(qemu_table(), jailer_root=vm_root)
    await vm.prepare_vm("slow")
    # far less than a TCG boot takes
    with pytest.raises(VmTimeout, match=r"did not boot within 0\.3s"):
        await vm.start_vm(timeout=0.3)
    leftover_check(vm_root)
