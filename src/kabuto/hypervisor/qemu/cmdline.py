"""The QEMU command line and the QMP arguments for each device, built from the config table.

Pure functions (no I/O), so the exact command line is unit-tested and documented in docs/qemu.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError
from kabuto.hypervisor.base import GUEST_PANIC_PARAMS
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    VfioDevice,
)
from kabuto.hypervisor.host import Accelerator

#: hot-plug slots on q35: PCIe root ports created at boot (q35 cannot hot-plug onto pcie.0)
DEFAULT_ROOT_PORTS = 4
# Onboard devices a sandbox never uses, off so that firmware and guest do not probe them (AHCI,
# SMBus, VMware port, SMM); measured in docs/qemu.md. machine_accelerators adds to these.
LEAN_MACHINE_OPTIONS = {
    "q35": ("sata=off", "smbus=off", "vmport=off", "smm=off"),
    "pc": ("vmport=off", "smm=off"),
}
#: virtio-blk's serial is at most 20 bytes; the guest finds the disk by it (/sys/block/vdX/serial)
BLOCK_SERIAL_MAX = 20
VIRTIO_SERIAL_BUS = "virtio-serial0"
MEMORY_BACKEND_ID = "guest-ram"
SCSI_BUS = "scsi0"
#: the iothread enable_iothreads adds: virtio-blk disks and the virtio-scsi controller run their I/O on it
IOTHREAD_ID = "iothread0"

# Kernel parameters that shorten boot without changing what the guest can do (after Kata's
# defaults): no legacy keyboard probing, trust the TSC, skip crypto self-tests, reboot = exit.
BOOT_KERNEL_PARAMS = (
    f"console=ttyS0 {GUEST_PANIC_PARAMS} reboot=k tsc=reliable no_timer_check noreplace-smp "
    "cryptomgr.notests "
    "i8042.noaux=1 i8042.nomux=1 i8042.nopnp=1 i8042.dumbkbd=1 rcupdate.rcu_expedited=1 net.ifnames=0"
)


@dataclass(frozen=True)
class VmPaths:
    """Every host path a VM uses; all live in the VM directory so cleanup removes one tree."""

    vm_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.vm_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.vm_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.vm_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.vm_dir / "qemu.log"

    @property
    def agent_socket(self) -> Path:
        return self.vm_dir / "agent.sock"

    def agent_port_socket(self, index: int) -> Path:
        """The socket of virtio-serial agent port ``index`` (0 is the primary agent_socket)."""
        return self.agent_socket if index == 0 else self.vm_dir / f"agent-{index}.sock"

    @property
    def saved_state(self) -> Path:
        """Where save_vm writes the migration stream (RAM and device state)."""
        return self.vm_dir / "vm.state"


def hotplug_bus(machine_type: str, index: int) -> str:
    """The bus a hot-plugged PCI device goes on: a free root port (q35) or the root bus (pc)."""
    if machine_type == "q35":
        return f"hp{index}"
    return "pci.0"


def use_vhost_net(table: HypervisorConfig, accel: Accelerator, vhost_net_present: bool) -> bool:
    """vhost-net moves packets in the host kernel, but needs KVM's irqfd and /dev/vhost-net."""
    return not table.disable_vhost_net and accel.name == "kvm" and vhost_net_present


def root_port_count(table: HypervisorConfig) -> int:
    return table.pcie_root_port if table.pcie_root_port > 0 else DEFAULT_ROOT_PORTS


def kernel_append(table: HypervisorConfig) -> str:
    params = [BOOT_KERNEL_PARAMS]
    if not table.enable_debug:
        params.append("quiet")
    if table.kernel_params:
        params.append(table.kernel_params)
    return " ".join(params)


def accel_args(accel: Accelerator, table: HypervisorConfig) -> list[str]:
    if accel.name == "kvm":
        cpu = "host"
        accel_opt = "kvm"
    else:
        # Multi-threaded TCG: one host thread per vCPU, so vCPU thread ids are real threads.
        cpu = "max"
        accel_opt = "tcg,thread=multi"
        if table.tcg_tb_size:
            accel_opt += f",tb-size={table.tcg_tb_size}"
    if table.cpu_features:
        cpu += "," + table.cpu_features
    return ["-accel", accel_opt, "-cpu", cpu]


def block_serial(device: BlockDevice) -> str:
    return device.id[:BLOCK_SERIAL_MAX]


def blockdev_args(device: BlockDevice, table: HypervisorConfig) -> dict[str, object]:
    """QMP blockdev-add arguments (also the JSON form of -blockdev)."""
    read_only = device.read_only
    file: dict[str, object] = {"driver": "file", "filename": str(device.path), "read-only": read_only}
    if table.block_device_aio:
        file["aio"] = table.block_device_aio
    cache: dict[str, bool] = {}
    if table.block_device_cache_set:
        cache = {"direct": table.block_device_cache_direct, "no-flush": table.block_device_cache_noflush}
    # QEMU refuses aio=native without O_DIRECT: Linux native AIO is asynchronous only then
    if table.block_device_aio == "native":
        cache["direct"] = True
    if cache:
        file["cache"] = cache
    return {"node-name": f"drive-{device.id}", "driver": device.format, "read-only": read_only, "file": file}


def block_device_args(device: BlockDevice, driver: str, bus: str | None,
                      iothread: str | None = None) -> dict[str, object]:
    """QMP device_add arguments for a block device (also the -device form). ``iothread``: the
    virtio-blk disk's (a virtio-scsi disk runs on its controller's)."""
    node = f"drive-{device.id}"
    if driver == "virtio-scsi":
        return {"driver": "scsi-hd", "id": device.id, "drive": node, "bus": f"{SCSI_BUS}.0",
                "serial": block_serial(device)}
    args: dict[str, object] = {"driver": "virtio-blk-pci", "id": device.id, "drive": node,
                               "serial": block_serial(device)}
    if iothread:
        args["iothread"] = iothread
    if bus:
        args["bus"] = bus
    return args


def block_iothread(table: HypervisorConfig) -> str | None:
    return IOTHREAD_ID if table.enable_iothreads else None


def netdev_args(device: NetworkDevice, vhost: bool, fd_names: list[str] | None = None) -> dict[str, object]:
    """The tap by name in QEMU's netns, or (``fd_names``) by the descriptors passed to it
    (QEMU takes neither ifname, script nor queues with them: one descriptor per queue)."""
    if fd_names:
        passed = {"fd": fd_names[0]} if len(fd_names) == 1 else {"fds": ":".join(fd_names)}
        return {"type": "tap", "id": f"net-{device.id}", **passed, "vhost": vhost}
    args: dict[str, object] = {"type": "tap", "id": f"net-{device.id}", "ifname": device.tap_name,
                               "script": "no", "downscript": "no", "vhost": vhost}
    if device.queues > 1:
        args["queues"] = device.queues  # QEMU opens the multi-queue tap once per queue
    return args


def net_device_args(device: NetworkDevice, bus: str | None) -> dict[str, object]:
    args: dict[str, object] = {"driver": "virtio-net-pci", "id": device.id, "netdev": f"net-{device.id}"}
    if device.queues > 1:
        # a vector per rx and tx queue, one for the control queue and one for config changes
        args.update(mq=True, vectors=2 * device.queues + 2)
    if device.mac:
        args["mac"] = device.mac
    if device.mtu and device.mtu != 1500:
        args["host_mtu"] = device.mtu
    if bus:
        args["bus"] = bus
    return args


def fsdev_cmdline(device: SharedFsDevice) -> list[str]:
    """A 9p share's backend (``-fsdev``): no device, so no migration state; a clone of a template
    carries it on its command line and gets the device by hot-plug (QMP has no fsdev_add)."""
    # multidevs=remap: a share spanning several host filesystems keeps inode numbers unique
    fsdev = (f"local,id=fs-{device.id},path={_path_opt(device.host_path)},security_model=none,"
             "multidevs=remap")
    if device.read_only:
        fsdev += ",readonly=on"
    return ["-fsdev", fsdev]


def virtio_9p_device_args(device: SharedFsDevice, bus: str | None) -> dict[str, object]:
    args: dict[str, object] = {"driver": "virtio-9p-pci", "id": device.id, "fsdev": f"fs-{device.id}",
                               "mount_tag": device.mount_tag}
    if bus:
        args["bus"] = bus
    return args


def _device_opt(args: dict[str, object]) -> str:
    """``-device`` option string from device_add-style arguments."""
    args = dict(args)
    driver = args.pop("driver")
    parts = [str(driver)]
    for key, value in args.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        text = str(value)
        if "," in text:
            raise HypervisorError(f"qemu: device option {key}={text!r} must not contain a comma")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _netdev_opt(args: dict[str, object]) -> str:
    return _device_opt({"driver": args["type"], **{k: v for k, v in args.items() if k != "type"}})


def _path_opt(path: Path) -> str:
    # QEMU's option syntax escapes a comma as two commas.
    return str(path).replace(",", ",,")


def device_cmdline(device: AnyDevice, table: HypervisorConfig, vhost_net: bool = False) -> list[str]:
    """The cold-plug arguments for one pending device."""
    if isinstance(device, AgentChannel):
        if device.channel == ChannelKind.VIRTIO_SERIAL:
            if device.socket_path is None:
                raise HypervisorError(f"qemu: agent channel {device.id} has no socket path")
            return [
                "-chardev",
                f"socket,id=chr-{device.id},path={_path_opt(device.socket_path)},server=on,wait=off",
                "-device", _device_opt({"driver": "virtserialport", "bus": f"{VIRTIO_SERIAL_BUS}.0",
                                        "chardev": f"chr-{device.id}", "name": device.name,
                                        "id": device.id}),
            ]
        if device.channel == ChannelKind.VSOCK:
            return ["-device", _device_opt({"driver": "vhost-vsock-pci", "id": device.id,
                                            "guest-cid": device.guest_cid})]
        raise HypervisorError(f"qemu: agent channel kind {device.channel.value} is not supported")
    if isinstance(device, BlockDevice):
        driver = table.block_device_driver or "virtio-blk"
        return ["-blockdev", json.dumps(blockdev_args(device, table)),
                "-device", _device_opt(block_device_args(device, driver, None, block_iothread(table)))]
    if isinstance(device, NetworkDevice):
        return ["-netdev", _netdev_opt(netdev_args(device, vhost=vhost_net)),
                "-device", _device_opt(net_device_args(device, None))]
    if isinstance(device, SharedFsDevice) and device.fs == SharedFsKind.VIRTIO_FS:
        if device.daemon_socket is None:
            raise HypervisorError(f"qemu: virtio-fs share {device.id} has no virtiofsd socket")
        return ["-chardev", f"socket,id=chr-{device.id},path={_path_opt(device.daemon_socket)}",
                "-device", _device_opt({"driver": "vhost-user-fs-pci", "id": device.id,
                                        "chardev": f"chr-{device.id}", "tag": device.mount_tag,
                                        "queue-size": table.virtio_fs_queue_size or 1024})]
    if isinstance(device, SharedFsDevice):
        return [*fsdev_cmdline(device), "-device", _device_opt(virtio_9p_device_args(device, None))]
    if isinstance(device, VfioDevice):
        raise HypervisorError("qemu: VFIO devices are not supported by this backend")
    raise HypervisorError(f"qemu: unknown device {device!r}")


def build_command(
    table: HypervisorConfig,
    accel: Accelerator,
    paths: VmPaths,
    devices: list[AnyDevice],
    name: str,
    incoming: bool = False,
    vhost_net: bool = False,
    memory_file: MemoryFile | None = None,
    fsdevs: list[SharedFsDevice] | None = None,
) -> list[str]:
    """The whole QEMU command line. QEMU starts paused (-S) so QMP listeners are in place before boot.
    ``memory_file``: guest RAM in that file (a template, or a clone of one); ``fsdevs``: 9p share
    backends without their device (a clone's, hot-plugged after its restore)."""
    if not table.kernel:
        raise HypervisorError("qemu: no guest kernel configured (build one with `kabuto image build`)")
    vcpus = max(1, math.ceil(table.default_vcpus))
    maxvcpus = max(vcpus, table.default_maxvcpus)
    memory = memory_backend(table, devices, memory_file)
    args = [
        table.path,
        "-name", f"kabuto-{name}",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-S",
        "-machine", ",".join([table.machine_type, *_machine_extra(table),
                              *([f"memory-backend={MEMORY_BACKEND_ID}"] if memory else [])]),
        *accel_args(accel, table),
        "-m", memory_size(table),
        *memory,
        "-smp", f"{vcpus},maxcpus={maxvcpus}",
        "-qmp", f"unix:{_path_opt(paths.qmp_socket)},server=on,wait=off",
        "-chardev", f"socket,id=console,path={_path_opt(paths.console_socket)},server=on,wait=off",
        "-serial", "chardev:console",
        "-kernel", table.kernel,
        "-append", kernel_append(table),
        "-device", f"virtio-serial-pci,id={VIRTIO_SERIAL_BUS}",
        # a generation id QEMU changes after an incoming migration: the guest kernel's vmgenid
        # driver then reseeds its RNG at once (a clone of a template, a restored snapshot)
        "-device", "vmgenid,guid=auto",
    ]
    if table.firmware:
        args += ["-bios", table.firmware]
    if table.initrd:
        args += ["-initrd", table.initrd]
    if table.image:
        args += ["-drive", f"file={_path_opt(Path(table.image))},if=none,id=rootfs,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=rootfs,id=rootfs-dev"]
    if table.machine_type == "q35":
        for index in range(root_port_count(table)):
            args += ["-device", f"pcie-root-port,id={hotplug_bus('q35', index)},bus=pcie.0,"
                                f"chassis={index + 1},slot={index + 1}"]
    if table.enable_iothreads:
        args += ["-object", f"iothread,id={IOTHREAD_ID}"]
    if table.block_device_driver == "virtio-scsi":
        args += ["-device", _device_opt({"driver": "virtio-scsi-pci", "id": SCSI_BUS,
                                         **({"iothread": IOTHREAD_ID} if table.enable_iothreads else {})})]
    for device in devices:
        args += device_cmdline(device, table, vhost_net)
    for share in fsdevs or []:
        args += fsdev_cmdline(share)
    if table.seccomp_sandbox:
        args += ["-sandbox", table.seccomp_sandbox]
    if incoming:
        args += ["-incoming", "defer"]
    return args


def _machine_extra(table: HypervisorConfig) -> list[str]:
    return [*LEAN_MACHINE_OPTIONS.get(table.machine_type, ()),
            *(a.strip() for a in table.machine_accelerators.split(",") if a.strip())]


def memory_size(table: HypervisorConfig) -> str:
    """``-m``: with default_maxmemory above default_memory, room to hot-plug memory up to it
    (DIMMs in memory_slots slots, or virtio-mem), as Kata gives it; the boot RAM is unchanged."""
    size = f"{table.default_memory}M"
    if table.default_maxmemory > table.default_memory:
        return f"{size},slots={table.memory_slots},maxmem={table.default_maxmemory}M"
    return size


@dataclass(frozen=True)
class MemoryFile:
    """Guest RAM in a file: a template's, shared (its pages reach the file, x-ignore-shared
    leaves them out of the migration stream), or a clone's mapping of it, private (copy-on-write:
    clones share the pages they only read)."""

    path: Path
    shared: bool


def memory_backend(table: HypervisorConfig, devices: list[AnyDevice],
                   memory_file: MemoryFile | None = None) -> list[str]:
    """Guest RAM that a vhost-user daemon (virtiofsd) can map: a memfd, or the file
    ``file_mem_backend`` names, shared. Without either, QEMU's private anonymous RAM."""
    size = f"size={table.default_memory}M"
    if memory_file is not None:
        share = "on" if memory_file.shared else "off"
        return ["-object", f"memory-backend-file,id={MEMORY_BACKEND_ID},{size},"
                           f"mem-path={_path_opt(memory_file.path)},share={share}"]
    vhost_user = any(isinstance(d, SharedFsDevice) and d.fs == SharedFsKind.VIRTIO_FS for d in devices)
    if not (vhost_user or table.file_mem_backend):
        return []
    if table.file_mem_backend:
        mem_path = _path_opt(Path(table.file_mem_backend))
        backend = f"memory-backend-file,id={MEMORY_BACKEND_ID},{size},mem-path={mem_path}"
    else:
        backend = f"memory-backend-memfd,id={MEMORY_BACKEND_ID},{size}"
    return ["-object", f"{backend},share=on"]
