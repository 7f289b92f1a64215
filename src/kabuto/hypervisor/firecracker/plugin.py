"""Firecracker's configuration plugin: defaults, validation, capabilities, availability."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from kabuto.config.model import HypervisorConfig
from kabuto.errors import Problem
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import ChannelKind
from kabuto.hypervisor.host import find_binary, kvm_usability
from kabuto.hypervisor.plugin import Availability, BasePlugin

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor

CAPABILITIES = Capabilities(
    hotplug=frozenset(),
    pause=True,
    snapshot=True,
    shared_fs=frozenset(),
    network=True,
    agent_channels=(ChannelKind.HYBRID_VSOCK,),
    jailer=True,
    notes=(
        "no hot-plug, no shared fs: devices are cold-plugged, the rootfs goes in as a block device",
        "verified against its API contract only (tests/contract), never a real binary",
    ),
)


class FirecrackerPlugin(BasePlugin):
    aliases = ("fc",)
    default_binary = "firecracker"
    # Kata runtime-rs: MIN_FIRECRACKER_MEMORY_SIZE_MB and the 32-vCPU limit
    min_memory_mib = 128
    max_vcpus = 32
    block_drivers = ("virtio-blk-mmio", "virtio-blk")
    shared_fs_kinds = ("none",)
    max_network_queues = 1  # its NetworkInterface has no queue count

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = super().validate(table)
        # the jailer refuses an exec file whose name lacks "firecracker"
        if table.jailer_path and "firecracker" not in os.path.basename(table.path):
            problems.append(
                Problem(
                    "path", table.path, "under the jailer the binary's file name must contain 'firecracker'"
                )
            )
        return problems

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def availability(self, table: HypervisorConfig) -> Availability:
        reasons: list[str] = []
        binary = find_binary(table.path, self.default_binary)
        if not binary:
            reasons.append(f"firecracker binary not found ({table.path or 'not on PATH'})")
        if table.jailer_path and not find_binary(table.jailer_path):
            reasons.append(f"jailer not found or not executable ({table.jailer_path})")
        if table.jailer_path and os.geteuid() != 0:
            reasons.append("the jailer must run as root (it builds a chroot and creates device nodes)")
        accel = kvm_usability()
        if accel.name != "kvm":
            reasons.append(f"Firecracker needs KVM: {accel.reason}")
        return Availability(not reasons, reasons, binary, accel.name)

    def backend(self) -> type[Hypervisor]:
        from kabuto.hypervisor.firecracker.backend import Firecracker

        return Firecracker


plugin = FirecrackerPlugin()
