"""What a backend can do; callers choose strategies from this, never from a VMM's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind


@dataclass(frozen=True)
class Capabilities:
    hotplug: frozenset[DeviceKind] = frozenset()
    pause: bool = False
    snapshot: bool = False
    shared_fs: frozenset[SharedFsKind] = frozenset()
    agent_channels: tuple[ChannelKind, ...] = ()
    jailer: bool = False
    # extra facts a backend wants to publish (shown by `kabuto hypervisors`)
    notes: tuple[str, ...] = field(default_factory=tuple)

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
            notes=tuple(str(n) for n in data.get("notes", [])),
        )
