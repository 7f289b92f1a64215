"""The QEMU plugin: defaults, validation extras, capabilities and host availability."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from kabuto.config.model import HypervisorConfig
from kabuto.errors import Problem
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind
from kabuto.hypervisor.host import choose_accelerator, find_binary
from kabuto.hypervisor.plugin import Availability, BasePlugin

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor

#: machine types the backend knows how to drive (hot-plug needs PCI, so no microvm)
MACHINE_TYPES = ("q35", "pc")
#: QEMU's limit on memory hot-plug slots (x86's ACPI_MAX_RAM_SLOTS)
MAX_MEMORY_SLOTS = 256

CAPABILITIES = Capabilities(
    hotplug=frozenset({DeviceKind.BLOCK, DeviceKind.NETWORK}),
    pause=True,
    snapshot=True,
    shared_fs=frozenset({SharedFsKind.VIRTIO_FS, SharedFsKind.VIRTIO_9P}),
    network=True,
    # QMP getfd (SCM_RIGHTS) then netdev_add tap fd=
    network_tap_fd=True,
    agent_channels=(ChannelKind.VIRTIO_SERIAL, ChannelKind.VSOCK),
    jailer=False,
    # vCPU hot-add (device_add of the CPU model) and DIMM hot-add (pc-dimm), ACPI in the guest
    resize_vcpu=True,
    resize_memory=True,
    # memory-backend-file shared in the template, private in its clones; x-ignore-shared migration
    template=True,
    notes=(
        "machine q35: PCI(e) hot-plug of virtio-blk and virtio-net through QMP",
        "agent over virtio-serial here; vsock where /dev/vhost-vsock exists",
        "shared fs: virtio-fs (a virtiofsd per share, guest memory shared) or virtio-9p",
        "VM templates: clones map the template's memory private; their 9p share is hot-plugged",
    ),
)


class QemuPlugin(BasePlugin):
    default_binary = "qemu-system-x86_64"
    # Kata defaults to 2048 MiB; the guest here is an initrd plus the agent, and every MiB
    # is host RAM on a small machine, so 512 leaves room for containers without waste.
    default_memory_mib = 512
    # Kata runtime-rs's MIN_QEMU_MEMORY_SIZE_MB
    min_memory_mib = 64
    default_machine_type = "q35"
    block_drivers = ("virtio-blk", "virtio-scsi")
    # virtio-fs first: Kata's default for QEMU
    shared_fs_kinds = ("virtio-fs", "virtio-9p", "none")
    #: where Debian's QEMU (qemu-system-common) and Kata install virtiofsd
    virtiofsd_paths = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")

    def adjust(self, table: HypervisorConfig) -> None:
        super().adjust(table)
        if table.shared_fs == "virtio-fs" and not table.virtio_fs_daemon:
            table.virtio_fs_daemon = find_binary("", *self.virtiofsd_paths)

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = super().validate(table)
        if table.machine_type not in MACHINE_TYPES:
            problems.append(
                Problem("machine_type", table.machine_type,
                        f"must be one of {', '.join(MACHINE_TYPES)} (hot-plug needs PCI)")
            )
        if table.default_maxmemory > table.default_memory and table.memory_slots > MAX_MEMORY_SLOTS:
            problems.append(Problem("memory_slots", table.memory_slots,
                                    f"QEMU allows at most {MAX_MEMORY_SLOTS}"))
        if table.shared_fs == "virtio-fs" and not table.virtio_fs_daemon:
            problems.append(Problem("virtio_fs_daemon", "", "shared_fs = virtio-fs needs virtiofsd, found at "
                                    f"none of {', '.join(self.virtiofsd_paths)} "
                                    "(apt-get install qemu-system-common)"))
        return problems

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def capabilities_for(self, table: HypervisorConfig) -> Capabilities:
        configured = super().capabilities_for(table)
        # a vhost-user-fs device blocks migration, QEMU's snapshot
        if SharedFsKind.VIRTIO_FS in configured.shared_fs:
            return replace(configured, snapshot=False)
        return configured

    def availability(self, table: HypervisorConfig) -> Availability:
        # a configured path must itself work: never fall back to another binary on PATH
        binary = find_binary(table.path) if table.path else find_binary("", self.default_binary)
        accel = choose_accelerator(table.accel)
        reasons = [f"accelerator {accel.name}: {accel.reason}"]
        if not binary:
            reasons.insert(0, f"{table.path or self.default_binary} not found or not executable")
        else:
            reasons.insert(0, f"binary {binary}")
        return Availability(available=bool(binary), reasons=reasons, binary=binary, accelerator=accel.name)

    def backend(self) -> type[Hypervisor]:
        from kabuto.hypervisor.qemu.backend import QemuHypervisor

        return QemuHypervisor


plugin = QemuPlugin()
