"""Cloud Hypervisor's configuration plugin: defaults, validation, capabilities, availability."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kabuto.config.model import HypervisorConfig
from kabuto.errors import Problem
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind
from kabuto.hypervisor.host import find_binary, kvm_usability
from kabuto.hypervisor.plugin import Availability, BasePlugin

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor

CAPABILITIES = Capabilities(
    hotplug=frozenset({DeviceKind.BLOCK, DeviceKind.NETWORK, DeviceKind.SHARED_FS}),
    pause=True,
    snapshot=True,
    shared_fs=frozenset({SharedFsKind.VIRTIO_FS}),
    network=True,
    agent_channels=(ChannelKind.HYBRID_VSOCK,),
    jailer=False,
    notes=(
        "REST API on a Unix socket; virtio-fs through a virtiofsd per share; agent over hybrid vsock",
        "verified against its API contract only (tests/contract), never a real binary",
    ),
)


MAX_QUEUE_SIZE = 32768


class CloudHypervisorPlugin(BasePlugin):
    aliases = ("clh",)
    default_binary = "cloud-hypervisor"
    min_memory_mib = 64
    max_vcpus = 256
    block_drivers = ("virtio-blk-pci", "virtio-blk")
    shared_fs_kinds = ("virtio-fs", "none")

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = super().validate(table)
        if table.valid_jailer_paths:
            problems.append(
                Problem("valid_jailer_paths", table.valid_jailer_paths, "must be empty for Cloud Hypervisor")
            )
        if table.shared_fs == "virtio-fs" and not table.virtio_fs_daemon:
            problems.append(Problem("virtio_fs_daemon", "", "shared_fs = virtio-fs needs a virtiofsd path"))
        # a split virtqueue's size is a power of two, at most 32768 (the virtio specification)
        size = table.queue_size
        if size and not (size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            problems.append(Problem("queue_size", size,
                                    f"must be 0 or a power of two up to {MAX_QUEUE_SIZE}"))
        return problems

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def availability(self, table: HypervisorConfig) -> Availability:
        reasons: list[str] = []
        binary = find_binary(table.path, self.default_binary)
        if not binary:
            reasons.append(f"cloud-hypervisor binary not found ({table.path or 'not on PATH'})")
        accel = kvm_usability()
        if accel.name != "kvm":
            reasons.append(f"Cloud Hypervisor needs KVM: {accel.reason}")
        if table.shared_fs == "virtio-fs" and not find_binary(table.virtio_fs_daemon):
            reasons.append(f"virtiofsd not found ({table.virtio_fs_daemon or 'virtio_fs_daemon is empty'})")
        return Availability(not reasons, reasons, binary, accel.name)

    def backend(self) -> type[Hypervisor]:
        from kabuto.hypervisor.cloud_hypervisor.backend import CloudHypervisor

        return CloudHypervisor


plugin = CloudHypervisorPlugin()
