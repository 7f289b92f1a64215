"""The same lifecycle on every backend, driven by its declared capabilities, never its name.

Each target (see conftest.py) boots one VM; the tests below run in order against it:
prepare and start, agent health, a container, pause/resume, snapshot, device hot-plug,
wrong-state and unsupported operations, then stop and cleanup with nothing left on the host.
Where a capability is missing, the operation must fail with UnsupportedOperation; an
operation refused because of the VM's state fails with HypervisorError itself, on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio
from conformance_targets import Lifecycle, find_leftovers

from kabuto.agent import AgentClient
from kabuto.agent.address import parse_agent_address
from kabuto.agent.client import wait_for_agent
from kabuto.agent.containers import ContainerCallError, ContainerClient
from kabuto.errors import AgentError, HypervisorError, UnsupportedOperation
from kabuto.hypervisor.base import Hypervisor, VmStatus
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    VfioDevice,
)
from kabuto.runtime.busybox import find_busybox

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

AGENT_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0
# a paused guest must not answer within this
PAUSED_CHECK_TIMEOUT = 2.0
PROCESS_EXIT_TIMEOUT = 30.0
HOTPLUG_SEEN_TIMEOUT = 30.0
# how the agent address of each declared channel kind is written
CHANNEL_SCHEMES = {
    ChannelKind.VIRTIO_SERIAL: "unix",
    ChannelKind.VSOCK: "vsock",
    ChannelKind.HYBRID_VSOCK: "hvsock",
}


@contextlib.asynccontextmanager
async def agent_of(vm: Hypervisor) -> AsyncIterator[AgentClient]:
    client = await wait_for_agent(await vm.get_agent_socket(), AGENT_TIMEOUT, call_timeout=CALL_TIMEOUT)
    try:
        yield client
    finally:
        await client.close()


async def agent_answers(vm: Hypervisor, timeout: float) -> bool:
    """One bounded connect-and-Check: does the guest agent answer now?"""
    try:
        client = await AgentClient.connect(await vm.get_agent_socket(), timeout, call_timeout=timeout)
    except AgentError:
        return False
    try:
        return await client.check(timeout=timeout)
    except AgentError:
        return False
    finally:
        await client.close()


def assert_refused_for_state(exc_info: pytest.ExceptionInfo[HypervisorError]) -> None:
    """A wrong-state refusal is a plain HypervisorError, never 'unsupported'."""
    assert type(exc_info.value) is HypervisorError, repr(exc_info.value)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def container_spec(rootfs: str, args: list[str], *extra_mounts: dict[str, Any]) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": "conformance",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            *extra_mounts,
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


async def read_to_end(read: Any, container_id: str) -> bytes:
    data = bytearray()
    while chunk := await read(container_id, timeout=PROCESS_EXIT_TIMEOUT):
        data += chunk
    return bytes(data)


async def run_container(
    lifecycle: Lifecycle, container_id: str, args: list[str], *extra_mounts: dict[str, Any]
) -> tuple[int, bytes, bytes]:
    """Run a busybox command as a container in the guest; its exit status, stdout and stderr.

    The busybox binary is copied into the guest through the agent, so this works whatever
    shared filesystem (if any) the backend declares.
    """
    rootfs = f"{lifecycle.guest_scratch}/rootfs"
    async with agent_of(lifecycle.vm) as agent:
        containers = ContainerClient(agent, poll_interval=5.0)
        if not lifecycle.observed.get("busybox copied"):
            await containers.copy_file_in(f"{rootfs}/bin/busybox", find_busybox().read_bytes(), 0o755)
            lifecycle.observed["busybox copied"] = True
        spec = container_spec(rootfs, ["/bin/busybox", *args], *extra_mounts)
        await containers.create_container(container_id, spec, timeout=CALL_TIMEOUT)
        try:
            await containers.start_container(container_id, timeout=CALL_TIMEOUT)
            status, out, err = await asyncio.gather(
                containers.wait_process(container_id, timeout=PROCESS_EXIT_TIMEOUT),
                read_to_end(containers.read_stdout, container_id),
                read_to_end(containers.read_stderr, container_id),
            )
        finally:
            await containers.remove_container(container_id, timeout=CALL_TIMEOUT)
        with pytest.raises(ContainerCallError):
            await containers.list_processes(container_id)
    return status, out, err


async def guest_disk_serials(lifecycle: Lifecycle) -> set[str]:
    """The serial numbers of the guest's block devices, read from its sysfs in a container."""
    sysfs = {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro", "nosuid", "nodev"]}
    status, out, err = await run_container(
        lifecycle, "conformance-disks", ["sh", "-c", "cat /sys/block/*/serial 2>/dev/null; true"], sysfs
    )
    assert (status, err) == (0, b""), err
    return set(out.decode().split())


async def until_guest_sees(lifecycle: Lifecycle, serial: str) -> set[str]:
    """Poll (bounded) until the guest lists a disk with ``serial``; hot-plug is asynchronous."""
    deadline = asyncio.get_running_loop().time() + HOTPLUG_SEEN_TIMEOUT
    while serial not in (serials := await guest_disk_serials(lifecycle)):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    return serials


def sample_devices(lifecycle: Lifecycle) -> dict[DeviceKind, AnyDevice]:
    """One device of every kind, for checking which kinds a running VM refuses to take."""
    caps = lifecycle.vm.capabilities
    disk = lifecycle.host_scratch / "refused.img"
    disk.write_bytes(b"\0" * 4096)
    share = lifecycle.host_scratch / "refused-share"
    share.mkdir(exist_ok=True)
    return {
        DeviceKind.BLOCK: BlockDevice("conf-refused-disk", disk),
        DeviceKind.NETWORK: NetworkDevice("conf-refused-net", tap_name="kbcrefused0"),
        DeviceKind.SHARED_FS: SharedFsDevice(
            "conf-refused-fs", caps.preferred_shared_fs() or SharedFsKind.VIRTIO_9P, share, "conformance"
        ),
        DeviceKind.VFIO: VfioDevice("conf-refused-vfio", bdf="0000:00:1f.7"),
        DeviceKind.AGENT_CHANNEL: AgentChannel(
            "conf-refused-channel",
            caps.agent_channels[0] if caps.agent_channels else ChannelKind.VSOCK,
            socket_path=lifecycle.host_scratch / "refused-channel.sock",
        ),
    }


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def running_again(lifecycle: Lifecycle) -> AsyncIterator[None]:
    """A scenario that failed while the VM was paused must not fail the ones after it."""
    yield
    if lifecycle.vm.status == VmStatus.PAUSED:
        await asyncio.wait_for(lifecycle.vm.resume_vm(), CALL_TIMEOUT)


# --- the lifecycle, in order -------------------------------------------------------------------


async def test_prepare_then_start(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    assert lifecycle.observed["prepared"] == (VmStatus.PREPARED, True)
    assert lifecycle.observed["started"] == VmStatus.RUNNING
    assert vm.status == VmStatus.RUNNING
    assert vm.vm_path.parent == lifecycle.root
    pids = await vm.get_pids()
    assert pids and all(alive(pid) for pid in pids)
    threads = await vm.get_thread_ids()
    assert sorted(threads.vcpus) == list(range(int(vm.config.default_vcpus)))
    vmm_threads = {t.id for pid in pids for t in psutil.Process(pid).threads()}
    assert set(threads.vcpus.values()) <= vmm_threads
    state = await vm.save_state()
    assert (state.hypervisor_name, state.id, state.status) == (
        lifecycle.target.name, "conformance", VmStatus.RUNNING.value
    )
    assert set(state.pids) == set(pids)


async def test_agent_reachable_over_a_declared_channel(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    address = await vm.get_agent_socket()
    declared = {CHANNEL_SCHEMES[kind] for kind in vm.capabilities.agent_channels}
    assert parse_agent_address(address).scheme in declared, (address, vm.capabilities.agent_channels)
    async with agent_of(vm) as agent:
        assert await agent.check()
        details = await agent.guest_details()
    assert details.agent_version
    assert details.online_cpus >= 1


async def test_run_a_container(lifecycle: Lifecycle) -> None:
    message = f"hello from {lifecycle.target.id}"
    result = await run_container(lifecycle, "conformance-echo", ["echo", message])
    assert result == (0, f"{message}\n".encode(), b"")
    status, _, _ = await run_container(lifecycle, "conformance-exit", ["sh", "-c", "exit 7"])
    assert status == 7


async def test_pause_and_resume_as_declared(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    with pytest.raises(HypervisorError) as refused:
        await vm.resume_vm()
    assert_refused_for_state(refused)
    if not vm.capabilities.pause:
        with pytest.raises(UnsupportedOperation):
            await vm.pause_vm()
        assert vm.status == VmStatus.RUNNING
        return
    await vm.pause_vm()
    assert vm.status == VmStatus.PAUSED
    assert not await agent_answers(vm, PAUSED_CHECK_TIMEOUT)
    with pytest.raises(HypervisorError) as refused:
        await vm.pause_vm()
    assert_refused_for_state(refused)
    await vm.resume_vm()
    assert vm.status == VmStatus.RUNNING
    async with agent_of(vm) as agent:
        assert await agent.check()


async def test_snapshot_as_declared(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    if not vm.capabilities.snapshot:
        with pytest.raises(UnsupportedOperation):
            await vm.save_vm()
        assert vm.status == VmStatus.RUNNING
        return
    saved = await vm.save_vm()
    assert saved.exists() and saved.is_relative_to(vm.vm_path)
    assert not saved.is_file() or saved.stat().st_size > 0
    # every backend leaves the saved VM paused; it runs on after resume
    assert vm.status == VmStatus.PAUSED
    await vm.resume_vm()
    async with agent_of(vm) as agent:
        assert await agent.check()


async def test_block_hotplug_as_declared(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    image = lifecycle.host_scratch / "hotplug.img"
    image.write_bytes(b"\0" * (8 << 20))
    disk = BlockDevice("conf-disk0", image)
    with pytest.raises(HypervisorError) as refused:
        await vm.remove_device(BlockDevice("conf-never-added", image))
    assert type(refused.value) is HypervisorError
    if not vm.capabilities.can_hotplug(DeviceKind.BLOCK):
        with pytest.raises(UnsupportedOperation):
            await vm.add_device(disk)
        assert disk not in vm.devices
        return
    assert await vm.add_device(disk) is disk
    assert disk in vm.devices and disk.guest_address
    # An API fake plugs nothing into a guest: its "guest" is this host, whose disks are its own.
    guest_is_real = lifecycle.target.fake_vmm is None
    if guest_is_real:
        assert disk.id in await until_guest_sees(lifecycle, disk.id)
    await vm.remove_device(disk)
    assert disk not in vm.devices
    if guest_is_real:
        assert disk.id not in await guest_disk_serials(lifecycle)
    async with agent_of(vm) as agent:
        assert await agent.check()


async def test_undeclared_hotplug_kinds_are_unsupported_alike(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    refused_kinds = [kind for kind in DeviceKind if not vm.capabilities.can_hotplug(kind)]
    before = (list(vm.devices), list(vm.pending_devices))
    samples = sample_devices(lifecycle)
    for kind in refused_kinds:
        with pytest.raises(UnsupportedOperation, match=vm.name):
            await vm.add_device(samples[kind])
    assert (vm.devices, vm.pending_devices) == before
    assert vm.status == VmStatus.RUNNING


async def test_stop_and_cleanup_leave_nothing(lifecycle: Lifecycle) -> None:
    vm = lifecycle.vm
    pids = await vm.get_pids()
    await vm.stop_vm()
    assert vm.status == VmStatus.STOPPED
    assert not [pid for pid in pids if alive(pid)]
    with pytest.raises(HypervisorError) as refused:
        await vm.pause_vm()
    assert_refused_for_state(refused)
    await vm.cleanup()
    await vm.cleanup()  # safe twice
    assert find_leftovers(lifecycle.root) == []
    assert not vm.vm_path.exists()
    if lifecycle.guest_scratch.startswith(str(lifecycle.host_scratch)):
        shutil.rmtree(lifecycle.guest_scratch, ignore_errors=True)


# --- a fresh backend of the same target: refusals before any VM exists ------------------------


async def test_operations_before_start_are_refused_alike(lifecycle: Lifecycle) -> None:
    fresh = type(lifecycle.vm)(lifecycle.vm.config, jailer_root=lifecycle.root)
    with pytest.raises(HypervisorError) as refused:
        await fresh.start_vm(5)
    assert_refused_for_state(refused)
    for operation in (fresh.pause_vm, fresh.resume_vm):
        with pytest.raises(HypervisorError) as refused:
            await operation()
        if operation == fresh.pause_vm and not fresh.capabilities.pause:
            assert isinstance(refused.value, UnsupportedOperation)
        else:
            assert_refused_for_state(refused)
    # before boot a device waits on the pending list, whatever the hot-plug capabilities
    disk = BlockDevice("conf-cold", Path(lifecycle.host_scratch / "cold.img"))
    assert await fresh.add_device(disk) is disk and disk in fresh.pending_devices
    await fresh.remove_device(disk)
    assert disk not in fresh.pending_devices
