"""Dragonball's configuration plugin (Kata's built-in VMM): adjust and validate as Kata does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorUnavailable, Problem
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind
from kabuto.hypervisor.dragonball.binding import UNAVAILABLE_REASON, current_binding
from kabuto.hypervisor.plugin import Availability, BasePlugin

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor

# What Kata's Dragonball offers; only reachable once a binding is registered.
CAPABILITIES = Capabilities(
    hotplug=frozenset({DeviceKind.BLOCK, DeviceKind.NETWORK, DeviceKind.SHARED_FS, DeviceKind.VFIO}),
    pause=True,
    snapshot=False,
    shared_fs=frozenset({SharedFsKind.VIRTIO_FS}),
    network=True,
    agent_channels=(ChannelKind.HYBRID_VSOCK,),
    jailer=False,
    notes=("in-process VMM: needs a Python binding, none exists",),
)

# Keys that name host resources an in-process VMM has no use for.
_MUST_BE_EMPTY = ("path", "ctlpath", "firmware", "machine_type", "pflashes", "valid_ctlpaths")
_MUST_BE_OFF = ("enable_iothreads", "rootless")


class DragonballPlugin(BasePlugin):
    default_binary = ""
    min_memory_mib = 64
    max_vcpus = 256
    # every name is the one virtio-blk device the backend attaches (virtio-pmem would be another)
    block_drivers = ("virtio-blk-pci", "virtio-blk-mmio", "virtio-blk")
    shared_fs_kinds = ("virtio-fs", "inline-virtio-fs")

    def adjust(self, table: HypervisorConfig) -> None:
        super().adjust(table)
        # Dragonball has no PCI bridges: the model's default of 1 does not apply.
        if "default_bridges" not in table.model_fields_set:
            table.default_bridges = 0

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = super().validate(table)
        for key in _MUST_BE_EMPTY:
            value = getattr(table, key)
            if value:
                problems.append(Problem(key, value, "must be empty: Dragonball is built into the runtime"))
        for key in _MUST_BE_OFF:
            if getattr(table, key):
                problems.append(Problem(key, True, "Dragonball does not support it"))
        if table.default_bridges:
            problems.append(
                Problem("default_bridges", table.default_bridges, "Dragonball has no PCI bridges; must be 0")
            )
        if table.pcie_root_port:
            problems.append(
                Problem(
                    "pcie_root_port", table.pcie_root_port, "Dragonball has no PCIe root ports; must be 0"
                )
            )
        return problems

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def availability(self, table: HypervisorConfig) -> Availability:
        if current_binding() is None:
            return Availability(False, [UNAVAILABLE_REASON])
        return Availability(True, [], "(in-process binding)", "kvm")

    def backend(self) -> type[Hypervisor]:
        if current_binding() is None:
            raise HypervisorUnavailable(f"dragonball: {UNAVAILABLE_REASON}")
        from kabuto.hypervisor.dragonball.backend import Dragonball

        return Dragonball


plugin = DragonballPlugin()
