"""The Hypervisor interface, its devices and capabilities, the plugin registry, and the one road
from configuration to backend (resolve, new_hypervisor, restore_hypervisor)."""

from kabuto.hypervisor.base import Hypervisor, HypervisorState, VcpuThreadIds, VmStatus
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import (
    AgentChannel,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    SharedFsMount,
    VfioDevice,
)
from kabuto.hypervisor.plugin import Availability, HypervisorPlugin
from kabuto.hypervisor.registry import get_plugin, register_hypervisor_plugin, registered_names
from kabuto.hypervisor.resolve import (
    ResolvedConfig,
    new_hypervisor,
    resolve,
    resolve_config,
    restore_hypervisor,
)

__all__ = [
    "AgentChannel",
    "Availability",
    "BlockDevice",
    "Capabilities",
    "ChannelKind",
    "DeviceKind",
    "Hypervisor",
    "HypervisorPlugin",
    "HypervisorState",
    "NetworkDevice",
    "ResolvedConfig",
    "SharedFsDevice",
    "SharedFsKind",
    "SharedFsMount",
    "VcpuThreadIds",
    "VfioDevice",
    "VmStatus",
    "get_plugin",
    "new_hypervisor",
    "register_hypervisor_plugin",
    "registered_names",
    "resolve",
    "resolve_config",
    "restore_hypervisor",
]
