"""Typed devices handed to a hypervisor backend.

A device added before ``start_vm`` waits on the backend's pending list (cold-plug); one
added after boot is hot-plugged where the backend's capabilities allow it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class DeviceKind(enum.StrEnum):
    BLOCK = "block"
    NETWORK = "network"
    AGENT_CHANNEL = "agent-channel"
    SHARED_FS = "shared-fs"
    VFIO = "vfio"


class ChannelKind(enum.StrEnum):
    VSOCK = "vsock"
    HYBRID_VSOCK = "hybrid-vsock"
    VIRTIO_SERIAL = "virtio-serial"


class SharedFsKind(enum.StrEnum):
    VIRTIO_9P = "virtio-9p"
    VIRTIO_FS = "virtio-fs"


@dataclass
class Device:
    """Common part: a stable id the backend uses to find the device again."""

    id: str

    kind: DeviceKind = field(init=False)


@dataclass
class BlockDevice(Device):
    path: Path
    read_only: bool = False
    format: str = "raw"
    # filled by the backend once plugged: where the guest will find it
    guest_address: str = ""

    def __post_init__(self) -> None:
        self.kind = DeviceKind.BLOCK


@dataclass
class NetworkDevice(Device):
    tap_name: str
    mac: str = ""
    netns: str = ""
    mtu: int = 1500

    def __post_init__(self) -> None:
        self.kind = DeviceKind.NETWORK


@dataclass
class AgentChannel(Device):
    """The host end of the guest agent's transport."""

    channel: ChannelKind
    # virtio-serial and hybrid vsock: the host Unix socket
    socket_path: Path | None = None
    # vsock / hybrid vsock
    guest_cid: int = 3
    port: int = 1024
    # virtio-serial: the port name the guest finds under /dev/virtio-ports/
    name: str = "agent.channel.0"

    def __post_init__(self) -> None:
        self.kind = DeviceKind.AGENT_CHANNEL


@dataclass
class SharedFsDevice(Device):
    """A host directory exported to the guest under ``mount_tag``."""

    fs: SharedFsKind
    host_path: Path
    mount_tag: str
    read_only: bool = False
    # virtio-fs: the daemon socket the backend created
    daemon_socket: Path | None = None

    def __post_init__(self) -> None:
        self.kind = DeviceKind.SHARED_FS


@dataclass
class SharedFsMount:
    """Where a shared-fs device is mounted in the guest."""

    device: SharedFsDevice
    guest_path: str
    options: list[str] = field(default_factory=list)


@dataclass
class VfioDevice(Device):
    """A host PCI device (``0000:01:00.0``) passed through with VFIO."""

    bdf: str
    iommu_group: str = ""

    def __post_init__(self) -> None:
        self.kind = DeviceKind.VFIO


AnyDevice = BlockDevice | NetworkDevice | AgentChannel | SharedFsDevice | VfioDevice
