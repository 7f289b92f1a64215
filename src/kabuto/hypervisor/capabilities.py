"""What a backend can do; callers choose strategies from this, never from a VMM's name."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind

#: [hypervisor.*] shared_fs values -> the device kind they name ("none": no shared filesystem)
SHARED_FS_VALUES = {
    "virtio-fs": SharedFsKind.VIRTIO_FS,
    "virtio-fs-nydus": SharedFsKind.VIRTIO_FS,
    "inline-virtio-fs": SharedFsKind.VIRTIO_FS,
    "virtio-9p": SharedFsKind.VIRTIO_9P,
}


@dataclass(frozen=True)
class Capabilities:
    hotplug: frozenset[DeviceKind] = frozenset()
    pause: bool = False
    snapshot: bool = False
    shared_fs: frozenset[SharedFsKind] = frozenset()
    agent_channels: tuple[ChannelKind, ...] = ()
    jailer: bool = False
    #: vCPUs and memory can be added to a running VM (Hypervisor.resize_vcpu, resize_memory)
    resize_vcpu: bool = False
    resize_memory: bool = False
    #: virtio-net NICs on host taps, cold-plugged at least (hot-plug: ``hotplug`` says)
    network: bool = False
    #: a hot-plugged NIC can use a tap of another network namespace than the VMM's: the tap is
    #: opened there and its file descriptor passed to the VMM (a VM booted before its pod's netns
    #: was known, as a VM factory's)
    network_tap_fd: bool = False
    #: VM templating: boot a template to agent-ready and save it, start clones that map its
    #: memory copy-on-write (Hypervisor.save_template, start_from_template)
    template: bool = False
    # extra facts a backend wants to publish (shown by `kabuto hypervisors`)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def configured(self, table: HypervisorConfig) -> Capabilities:
        """What the backend can do as ``table`` configures it: only the shared filesystem it
        names (``shared_fs = "none"``: none), and no block devices under disable_block_device_use."""
        chosen = SHARED_FS_VALUES.get(table.shared_fs)
        hotplug = self.hotplug - {DeviceKind.BLOCK} if table.disable_block_device_use else self.hotplug
        # room to grow only up to default_maxvcpus / default_maxmemory, as Kata sizes the VM
        return replace(self, shared_fs=self.shared_fs & {chosen} if chosen else frozenset(), hotplug=hotplug,
                       resize_vcpu=self.resize_vcpu and table.default_maxvcpus > table.default_vcpus,
                       resize_memory=self.resize_memory and table.default_maxmemory > table.default_memory)

    def can_hotplug(self, kind: DeviceKind) -> bool:
        return kind in self.hotplug

    def preferred_shared_fs(self) -> SharedFsKind | None:
        for kind in (SharedFsKind.VIRTIO_FS, SharedFsKind.VIRTIO_9P):
            if kind in self.shared_fs:
                return kind
        return None

    def to_dict(self) -> dict[str, object]:
        return {
            "hotplug": sorted(k.value for k in self.hotplug),
            "pause": self.pause,
            "snapshot": self.snapshot,
            "shared_fs": sorted(k.value for k in self.shared_fs),
            "agent_channels": [k.value for k in self.agent_channels],
            "jailer": self.jailer,
            "resize_vcpu": self.resize_vcpu,
            "resize_memory": self.resize_memory,
            "network": self.network,
            "network_tap_fd": self.network_tap_fd,
            "template": self.template,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        """What ``to_dict`` wrote (a sandbox record's); unknown kinds raise ValueError."""
        return cls(
            hotplug=frozenset(DeviceKind(k) for k in data.get("hotplug", [])),
            pause=bool(data.get("pause", False)),
            snapshot=bool(data.get("snapshot", False)),
            shared_fs=frozenset(SharedFsKind(k) for k in data.get("shared_fs", [])),
            agent_channels=tuple(ChannelKind(k) for k in data.get("agent_channels", [])),
            jailer=bool(data.get("jailer", False)),
            resize_vcpu=bool(data.get("resize_vcpu", False)),
            resize_memory=bool(data.get("resize_memory", False)),
            network=bool(data.get("network", False)),
            network_tap_fd=bool(data.get("network_tap_fd", False)),
            template=bool(data.get("template", False)),
            notes=tuple(str(n) for n in data.get("notes", [])),
        )
