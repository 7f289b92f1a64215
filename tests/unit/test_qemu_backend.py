"""QEMU backend without booting a guest: plugin rules, command line, preparation, errors, state."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable
from kabuto.hypervisor.base import HypervisorState, VmStatus
from kabuto.hypervisor.devices import (
    AgentChannel,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    device_from_dict,
    device_to_dict,
)
from kabuto.hypervisor.host import Accelerator
from kabuto.hypervisor.qemu import plugin
from kabuto.hypervisor.qemu.backend import AGENT_PORT_COUNT, QemuHypervisor
from kabuto.hypervisor.qemu.cmdline import VmPaths, build_command, kernel_append
from kabuto.hypervisor.qemu.console import CONSOLE_LOG_MAX_BYTES, CONSOLE_TAIL_BYTES, ConsoleReader
from kabuto.hypervisor.qemu.hotplug import Hotplug

TCG = Accelerator("tcg", "test")
KVM = Accelerator("kvm", "test")


@pytest.fixture
def table(tmp_path: Path) -> HypervisorConfig:
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    table = HypervisorConfig(kernel=str(kernel), initrd=str(initrd))
    plugin.adjust(table)
    return table


def _option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_plugin_defaults_and_capabilities(table: HypervisorConfig) -> None:
    assert table.machine_type == "q35"
    assert table.default_memory == 512
    assert table.block_device_driver == "virtio-blk"
    assert plugin.validate(table) == []
    caps = plugin.capabilities()
    assert caps.can_hotplug(DeviceKind.BLOCK) and caps.can_hotplug(DeviceKind.NETWORK)
    assert not caps.can_hotplug(DeviceKind.VFIO)
    assert caps.pause and caps.snapshot
    assert ChannelKind.VIRTIO_SERIAL in caps.agent_channels


@pytest.mark.parametrize(("key", "value"), [("machine_type", "microvm"), ("shared_fs", "inline-virtio-fs"),
                                            ("block_device_driver", "nvme")])
def test_plugin_rejects_what_the_backend_cannot_do(table: HypervisorConfig, key: str, value: str) -> None:
    setattr(table, key, value)
    assert key in [p.key for p in plugin.validate(table)]


def test_availability_names_binary_and_accelerator(table: HypervisorConfig) -> None:
    table.accel = "tcg"
    found = plugin.availability(table)
    assert found.accelerator == "tcg"
    assert any("accel = 'tcg'" in r for r in found.reasons)
    table.path = "/nonexistent/qemu-system-x86_64"
    missing = plugin.availability(table)
    assert not missing.available
    assert "/nonexistent/qemu-system-x86_64" in missing.reasons[0]


def test_command_line_tcg(table: HypervisorConfig, tmp_path: Path) -> None:
    paths = VmPaths(tmp_path / "vm")
    agent = AgentChannel("agent", ChannelKind.VIRTIO_SERIAL, socket_path=paths.agent_socket)
    disk = BlockDevice("disk0", tmp_path / "disk.img", read_only=True)
    share = SharedFsDevice("share0", SharedFsKind.VIRTIO_9P, tmp_path / "share", "shared")
    args = build_command(table, TCG, paths, [agent, disk, share], "vm1")
    assert args[0] == table.path
    assert {"-nodefaults", "-no-user-config", "-nographic", "-S", "-no-reboot"} <= set(args)
    assert _option(args, "-accel") == ["tcg,thread=multi"]  # QEMU's own translation cache size
    assert _option(args, "-cpu") == ["max"]
    assert _option(args, "-machine") == ["q35,sata=off,smbus=off,vmport=off,smm=off"]
    assert _option(args, "-m") == ["512M"]
    assert _option(args, "-qmp") == [f"unix:{paths.qmp_socket},server=on,wait=off"]
    assert _option(args, "-kernel") == [table.kernel]
    assert _option(args, "-initrd") == [table.initrd]
    assert "console=ttyS0" in _option(args, "-append")[0]
    # a guest kernel oops panics (it left virtio-fs's completion worker dead, the share hung)
    assert {"panic=1", "oops=panic"} <= set(_option(args, "-append")[0].split())
    devices = _option(args, "-device")
    assert "virtserialport,bus=virtio-serial0.0,chardev=chr-agent,name=agent.channel.0,id=agent" in devices
    assert "vmgenid,guid=auto" in devices
    assert "virtio-blk-pci,id=disk0,drive=drive-disk0,serial=disk0" in devices
    assert sum(d.startswith("pcie-root-port") for d in devices) == 4
    blockdev = json.loads(_option(args, "-blockdev")[0])
    assert blockdev["read-only"] is True and blockdev["file"]["filename"] == str(tmp_path / "disk.img")
    assert _option(args, "-fsdev") == [
        f"local,id=fs-share0,path={tmp_path / 'share'},security_model=none,multidevs=remap"]
    assert "-incoming" not in args and "-sandbox" not in args


def test_virtio_fs_is_the_default_and_shapes_memory_and_capabilities(table: HypervisorConfig,
                                                                      tmp_path: Path) -> None:
    assert table.shared_fs == "virtio-fs"
    assert table.virtio_fs_daemon and os.access(table.virtio_fs_daemon, os.X_OK), table.virtio_fs_daemon
    caps = plugin.capabilities_for(table)
    assert caps.shared_fs == {SharedFsKind.VIRTIO_FS} and not caps.snapshot  # vhost-user-fs blocks migration
    share = SharedFsDevice("share0", SharedFsKind.VIRTIO_FS, tmp_path, "shared",
                           daemon_socket=tmp_path / "fs-share0.sock")
    args = build_command(table, TCG, VmPaths(tmp_path), [share], "vm1")
    assert _option(args, "-machine") == ["q35,sata=off,smbus=off,vmport=off,smm=off,memory-backend=guest-ram"]
    assert _option(args, "-object") == ["memory-backend-memfd,id=guest-ram,size=512M,share=on"]
    assert f"socket,id=chr-share0,path={tmp_path}/fs-share0.sock" in _option(args, "-chardev")
    vhost = "vhost-user-fs-pci,id=share0,chardev=chr-share0,tag=shared,queue-size=1024"
    assert vhost in _option(args, "-device")
    table.file_mem_backend = "/dev/shm"
    args = build_command(table, TCG, VmPaths(tmp_path), [share], "vm1")
    assert _option(args, "-object") == [
        "memory-backend-file,id=guest-ram,size=512M,mem-path=/dev/shm,share=on"]


@pytest.mark.parametrize(("shared_fs", "kinds"), [("virtio-9p", {SharedFsKind.VIRTIO_9P}), ("none", set())])
def test_capabilities_follow_the_configured_shared_fs(table: HypervisorConfig, shared_fs: str,
                                                      kinds: set[SharedFsKind]) -> None:
    table.shared_fs = shared_fs
    table.disable_block_device_use = True
    caps = plugin.capabilities_for(table)
    assert caps.shared_fs == kinds and caps.snapshot
    assert not caps.can_hotplug(DeviceKind.BLOCK) and caps.can_hotplug(DeviceKind.NETWORK)


def test_command_line_kvm_sandbox_incoming_pc(table: HypervisorConfig, tmp_path: Path) -> None:
    table.machine_type = "pc"
    table.seccomp_sandbox = "on,obsolete=deny"
    table.kernel_params = "agent.debug=1"
    table.enable_debug = True
    args = build_command(table, KVM, VmPaths(tmp_path), [], "vm1", incoming=True)
    assert _option(args, "-accel") == ["kvm"] and _option(args, "-cpu") == ["host"]
    assert _option(args, "-sandbox") == ["on,obsolete=deny"]
    assert _option(args, "-incoming") == ["defer"]
    assert not any(d.startswith("pcie-root-port") for d in _option(args, "-device"))
    append = kernel_append(table)
    assert append.endswith("agent.debug=1") and "quiet" not in append.split()


def test_a_multi_queue_nic_opens_its_tap_once_per_queue(table: HypervisorConfig, tmp_path: Path) -> None:
    """network_queues = 2: the netdev opens the multi-queue tap twice; virtio-net gets mq and a
    vector per rx and tx queue plus the control and config ones; one queue pair adds neither."""
    nics = [NetworkDevice("net0", tap_name="tap0_kabuto", mac="02:00:00:00:00:01", mtu=1400, queues=2),
            NetworkDevice("net1", tap_name="tap1_kabuto", mac="02:00:00:00:00:02")]
    command = build_command(table, TCG, VmPaths(tmp_path), nics, "vm1")
    netdevs = [command[i + 1] for i, arg in enumerate(command) if arg == "-netdev"]
    devices = [arg for arg in command if arg.startswith("virtio-net-pci")]
    assert netdevs == ["tap,id=net-net0,ifname=tap0_kabuto,script=no,downscript=no,vhost=off,queues=2",
                       "tap,id=net-net1,ifname=tap1_kabuto,script=no,downscript=no,vhost=off"]
    assert devices == ["virtio-net-pci,id=net0,netdev=net-net0,mq=on,vectors=6,mac=02:00:00:00:00:01,"
                       "host_mtu=1400", "virtio-net-pci,id=net1,netdev=net-net1,mac=02:00:00:00:00:02"]


def test_command_line_refuses_comma_in_device_options(table: HypervisorConfig, tmp_path: Path) -> None:
    tap = NetworkDevice("net0", tap_name="tap,evil")
    with pytest.raises(HypervisorError, match="comma"):
        build_command(table, TCG, VmPaths(tmp_path), [tap], "vm1")


@pytest.mark.parametrize(("aio", "cache_set", "file_extra"), [
    ("", False, {}),
    ("io_uring", False, {"aio": "io_uring"}),
    ("threads", True, {"aio": "threads", "cache": {"direct": False, "no-flush": True}}),
    # aio=native needs O_DIRECT: cache.direct is on whatever the cache keys say
    ("native", False, {"aio": "native", "cache": {"direct": True}}),
    ("native", True, {"aio": "native", "cache": {"direct": True, "no-flush": True}}),
])
def test_block_device_aio_and_cache_shape_the_file_node(table: HypervisorConfig, tmp_path: Path, aio: str,
                                                         cache_set: bool, file_extra: dict) -> None:
    table.block_device_aio = aio
    table.block_device_cache_set = cache_set
    table.block_device_cache_noflush = True
    disk = BlockDevice("disk0", tmp_path / "disk.img")
    args = build_command(table, TCG, VmPaths(tmp_path), [disk], "vm1")
    blockdev = json.loads(_option(args, "-blockdev")[0])
    assert blockdev["file"] == {"driver": "file", "filename": str(tmp_path / "disk.img"), "read-only": False,
                                **file_extra}


def test_memory_headroom_up_to_default_maxmemory(table: HypervisorConfig, tmp_path: Path) -> None:
    share = SharedFsDevice("share0", SharedFsKind.VIRTIO_FS, tmp_path, "shared",
                           daemon_socket=tmp_path / "fs-share0.sock")
    table.default_maxmemory = table.default_memory  # no more than the boot RAM: no headroom
    assert _option(build_command(table, TCG, VmPaths(tmp_path), [], "vm1"), "-m") == ["512M"]
    table.default_maxmemory, table.memory_slots = 2048, 4
    args = build_command(table, TCG, VmPaths(tmp_path), [share], "vm1")
    assert _option(args, "-m") == ["512M,slots=4,maxmem=2048M"]
    # the memory backend holds the boot RAM only: hot-plugged memory brings its own
    assert _option(args, "-object") == ["memory-backend-memfd,id=guest-ram,size=512M,share=on"]
    assert _option(args, "-machine")[0].endswith(",memory-backend=guest-ram")
    assert plugin.validate(table) == []
    table.memory_slots = 257
    assert [p.key for p in plugin.validate(table)] == ["memory_slots"]


def test_msize_9p_is_checked_for_a_9p_share(table: HypervisorConfig) -> None:
    table.msize_9p = 1024
    assert plugin.validate(table) == []  # virtio-fs: not used
    table.shared_fs = "virtio-9p"
    assert [p.key for p in plugin.validate(table)] == ["msize_9p"]
    table.msize_9p = 512 * 1024
    assert plugin.validate(table) == []


@pytest.mark.parametrize("driver", ["virtio-blk", "virtio-scsi"])
def test_enable_iothreads_puts_block_io_on_an_iothread(table: HypervisorConfig, tmp_path: Path,
                                                       driver: str) -> None:
    table.block_device_driver = driver
    disk = BlockDevice("disk0", tmp_path / "disk.img")
    args = build_command(table, TCG, VmPaths(tmp_path), [disk], "vm1")
    assert _option(args, "-object") == [] and not any("iothread=" in d for d in _option(args, "-device"))
    table.enable_iothreads = True
    args = build_command(table, TCG, VmPaths(tmp_path), [disk], "vm1")
    assert "iothread,id=iothread0" in _option(args, "-object")
    devices = _option(args, "-device")
    if driver == "virtio-blk":
        assert "virtio-blk-pci,id=disk0,drive=drive-disk0,serial=disk0,iothread=iothread0" in devices
    else:
        assert "virtio-scsi-pci,id=scsi0,iothread=iothread0" in devices
        assert "scsi-hd,id=disk0,drive=drive-disk0,bus=scsi0.0,serial=disk0" in devices


class _RecordingQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    async def call(self, command: str, arguments: dict) -> dict:
        self.calls.append((command, arguments))
        return {}


async def test_hot_plugged_disk_gets_aio_and_iothread(table: HypervisorConfig, tmp_path: Path) -> None:
    table.block_device_aio, table.enable_iothreads = "io_uring", True
    qmp = _RecordingQmp()
    disk = BlockDevice("disk1", tmp_path / "disk.img")
    await Hotplug(qmp, table, {}, vhost_net=False).add(disk)  # type: ignore[arg-type]
    (add, blockdev), (device_add, device) = qmp.calls
    assert (add, device_add) == ("blockdev-add", "device_add")
    assert blockdev["file"]["aio"] == "io_uring"
    assert device == {"driver": "virtio-blk-pci", "id": "disk1", "drive": "drive-disk1", "serial": "disk1",
                      "iothread": "iothread0", "bus": "hp0"}
    assert disk.guest_address == "serial:disk1"


def test_command_line_without_kernel(tmp_path: Path) -> None:
    table = HypervisorConfig(path="/usr/bin/qemu-system-x86_64", machine_type="q35")
    with pytest.raises(HypervisorError, match="no guest kernel"):
        build_command(table, TCG, VmPaths(tmp_path), [], "vm1")


async def test_prepare_creates_dir_and_agent_channel(table: HypervisorConfig, vm_root: Path) -> None:
    vm = QemuHypervisor(table, jailer_root=vm_root)
    await vm.prepare_vm("sandbox-1")
    assert vm.status == VmStatus.PREPARED
    assert stat.S_ISDIR(os.stat(vm_root / "sandbox-1").st_mode)
    ports = vm.pending_devices
    assert all(isinstance(port, AgentChannel) for port in ports)
    assert [port.name for port in ports] == [f"agent.channel.{i}" for i in range(AGENT_PORT_COUNT)]
    assert len({port.id for port in ports}) == AGENT_PORT_COUNT
    assert await vm.get_agent_socket() == f"unix://{vm_root}/sandbox-1/agent.sock"
    assert await vm.get_agent_sockets() == [f"unix://{vm_root}/sandbox-1/agent.sock"] + [
        f"unix://{vm_root}/sandbox-1/agent-{i}.sock" for i in range(1, AGENT_PORT_COUNT)]
    # another process finds every port again
    restored = await QemuHypervisor.restore(await vm.save_state(), jailer_root=vm_root)
    assert restored.config == table  # the table it was made with, from the saved state
    assert await restored.get_agent_sockets() == await vm.get_agent_sockets()
    with pytest.raises(HypervisorError, match="needs new"):
        await vm.prepare_vm("sandbox-1")
    await vm.cleanup()
    await vm.cleanup()  # safe twice
    assert vm.status == VmStatus.STOPPED


@pytest.mark.parametrize(("kernel_params", "port"), [("", 1024), ("quiet agent_vsock_port=2049", 2049)])
async def test_with_vhost_vsock_the_host_dials_the_port_the_guest_is_told(
    table: HypervisorConfig, vm_root: Path, monkeypatch: pytest.MonkeyPatch, kernel_params: str, port: int
) -> None:
    from kabuto.hypervisor.qemu import backend

    monkeypatch.setattr(backend, "_exists", lambda path: path == backend.DEV_VHOST_VSOCK)
    table.kernel_params = kernel_params
    vm = QemuHypervisor(table, jailer_root=vm_root)
    await vm.prepare_vm("vsock-vm")
    try:
        address = await vm.get_agent_socket()
        assert address.startswith("vsock://") and address.endswith(f":{port}")
    finally:
        await vm.cleanup()


@pytest.mark.parametrize("bad_id", ["", "../escape", "a/b", "x" * 65, "-lead"])
async def test_prepare_refuses_bad_ids(table: HypervisorConfig, vm_root: Path, bad_id: str) -> None:
    vm = QemuHypervisor(table, jailer_root=vm_root)
    with pytest.raises(HypervisorError, match="VM id"):
        await vm.prepare_vm(bad_id)
    assert not os.listdir(vm_root)


async def test_prepare_refuses_socket_paths_too_long(table: HypervisorConfig, vm_root: Path) -> None:
    deep = vm_root / ("d" * 90)
    vm = QemuHypervisor(table, jailer_root=deep)
    with pytest.raises(HypervisorError, match="longer than 107 bytes"):
        await vm.prepare_vm("vm")
    assert not deep.exists()


async def test_prepare_refuses_existing_dir(table: HypervisorConfig, vm_root: Path) -> None:
    (vm_root / "taken").mkdir()
    vm = QemuHypervisor(table, jailer_root=vm_root)
    with pytest.raises(HypervisorError, match="already exists"):
        await vm.prepare_vm("taken")
    (vm_root / "taken").rmdir()


async def test_missing_binary(table: HypervisorConfig, vm_root: Path,
                              leftover_check: Callable[[Path], None]) -> None:
    table.path = "/nonexistent/qemu-system-x86_64"
    vm = QemuHypervisor(table, jailer_root=vm_root)
    with pytest.raises(HypervisorUnavailable, match="/nonexistent/qemu-system-x86_64"):
        await vm.check()
    await vm.prepare_vm("vm1")
    with pytest.raises(HypervisorError, match="QEMU binary /nonexistent/qemu-system-x86_64 not found"):
        await vm.start_vm(timeout=5)
    assert vm.status == VmStatus.STOPPED
    leftover_check(vm_root)


async def test_operations_need_the_right_state(table: HypervisorConfig, vm_root: Path) -> None:
    vm = QemuHypervisor(table, jailer_root=vm_root)
    with pytest.raises(HypervisorError, match="cannot pause: VM is new"):
        await vm.pause_vm()
    with pytest.raises(HypervisorError, match="cannot start the VM"):
        await vm.start_vm(timeout=1)
    with pytest.raises(HypervisorError, match="no agent channel"):
        await vm.get_agent_socket()
    await vm.stop_vm()  # nothing to stop is not an error


async def test_cold_plug_goes_on_the_pending_list(table: HypervisorConfig, vm_root: Path) -> None:
    vm = QemuHypervisor(table, jailer_root=vm_root)
    await vm.prepare_vm("vm1")
    disk = BlockDevice("disk0", vm_root / "disk.img")
    await vm.add_device(disk)
    assert disk in vm.pending_devices
    await vm.remove_device(disk)
    assert disk not in vm.pending_devices
    await vm.cleanup()


def test_devices_survive_serialisation(tmp_path: Path) -> None:
    devices = [
        AgentChannel("agent", ChannelKind.VIRTIO_SERIAL, socket_path=tmp_path / "a.sock"),
        BlockDevice("disk0", tmp_path / "d.img", read_only=True, guest_address="serial:disk0"),
        NetworkDevice("net0", "tap0", mac="02:00:00:00:00:01"),
        SharedFsDevice("fs0", SharedFsKind.VIRTIO_9P, tmp_path, "tag"),
    ]
    for device in devices:
        again = device_from_dict(json.loads(json.dumps(device_to_dict(device))))
        assert again == device and again.kind == device.kind


async def test_restore_of_a_vanished_vm_is_stopped(table: HypervisorConfig, vm_root: Path) -> None:
    state = HypervisorState("qemu", "gone", "running", str(vm_root / "gone"), str(vm_root),
                            pids=[2**22 + 12345], config=table.model_dump(mode="json"),
                            extra={"qemu": {"pid": 2**22 + 12345, "create_time": 1.0}})
    vm = await QemuHypervisor.restore(state)
    assert vm.status == VmStatus.STOPPED
    assert await vm.get_pids() == []
    await vm.cleanup()
    with pytest.raises(HypervisorError, match="cannot restore"):
        await QemuHypervisor.restore(HypervisorState("firecracker", "x", "running", "", str(vm_root)))


async def test_console_from_a_flooding_guest_stays_bounded(vm_root: Path) -> None:
    socket_path = vm_root / "console.sock"
    log_path = vm_root / "console.log"
    flood = b"x" * 4096
    total = CONSOLE_LOG_MAX_BYTES + 512 * 1024

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(flood)):
            writer.write(flood)
            await writer.drain()
        writer.write(b"\nlast line\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, str(socket_path))
    console = ConsoleReader(socket_path, log_path)
    try:
        await console.start()
        async with asyncio.timeout(30):
            while True:
                if console.tail().endswith(b"last line\n"):
                    break
                await asyncio.sleep(0.01)
    finally:
        await console.stop()
        server.close()
        await server.wait_closed()
    assert len(console.tail()) <= CONSOLE_TAIL_BYTES
    log_size = os.stat(log_path).st_size
    assert CONSOLE_LOG_MAX_BYTES <= log_size < CONSOLE_LOG_MAX_BYTES + 100
    socket_path.unlink()
    log_path.unlink()


def test_tcg_tb_size_sizes_tcg_s_translation_cache_only(table: HypervisorConfig, tmp_path: Path) -> None:
    table.tcg_tb_size = 0  # QEMU's own default: no option at all
    assert _option(build_command(table, TCG, VmPaths(tmp_path), [], "vm1"), "-accel") == ["tcg,thread=multi"]
    table.tcg_tb_size = 128
    assert _option(build_command(table, TCG, VmPaths(tmp_path), [], "vm1"), "-accel") == [
        "tcg,thread=multi,tb-size=128"]
    # KVM has no translation cache
    assert _option(build_command(table, KVM, VmPaths(tmp_path), [], "vm1"), "-accel") == ["kvm"]
