"""Typed devices handed to a hypervisor backend.

A device added before ``start_vm`` waits on the backend's pending list (cold-plug); one
added after boot is hot-plugged where the backend's capabilities allow it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


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
    # filled by the backend once plugged: where the guest will find it (a /dev path, or
    # serial_address(): the guest looks the disk up by the serial the backend gave it)
    guest_address: str = ""

    def __post_init__(self) -> None:
        self.kind = DeviceKind.BLOCK


def serial_address(serial: str) -> str:
    """A disk's address for the guest agent's Storage.source: the serial the VMM gave it."""
    return f"serial:{serial}"


@dataclass
class NetworkDevice(Device):
    tap_name: str
    mac: str = ""
    netns: str = ""
    mtu: int = 1500
    #: queue pairs: > 1 needs a multi-queue tap (IFF_MULTI_QUEUE) and a VMM that opens as many
    queues: int = 1

    def __post_init__(self) -> None:
        self.kind = DeviceKind.NETWORK


#: a host process claims a virtio-serial agent port (one connection at a time) by a lock file
#: at the port's socket path plus this suffix
PORT_LOCK_SUFFIX = ".lock"
#: the vsock port the guest agent listens on (reached with ``CONNECT <port>`` over hybrid vsock),
#: unless the kernel command line names another ([agent.kata] server_port, see kabuto.hypervisor.resolve)
AGENT_VSOCK_PORT = 1024
#: the kernel command-line word the guest's /init hands the agent as --vsock-port
AGENT_VSOCK_PORT_PARAM = "agent_vsock_port"
#: the guest's CID where the VMM's vsock is private to the VM (hybrid vsock)
HYBRID_VSOCK_GUEST_CID = 3


@dataclass
class AgentChannel(Device):
    """The host end of the guest agent's transport."""

    channel: ChannelKind
    # virtio-serial and hybrid vsock: the host Unix socket
    socket_path: Path | None = None
    # vsock / hybrid vsock
    guest_cid: int = HYBRID_VSOCK_GUEST_CID
    port: int = AGENT_VSOCK_PORT
    # virtio-serial: the port name the guest finds under /dev/virtio-ports/
    name: str = "agent.channel.0"

    def __post_init__(self) -> None:
        self.kind = DeviceKind.AGENT_CHANNEL

    def url(self) -> str:
        """The address the agent client dials: vsock://CID:PORT, hvsock://UDS:PORT or unix://UDS."""
        if self.channel == ChannelKind.VSOCK:
            return f"vsock://{self.guest_cid}:{self.port}"
        if self.channel == ChannelKind.HYBRID_VSOCK:
            return f"hvsock://{self.socket_path}:{self.port}"
        return f"unix://{self.socket_path}"


def agent_vsock_port(kernel_params: str) -> int:
    """The vsock port the guest agent serves: the kernel command line's agent_vsock_port= (the last
    one, as the kernel hands /init the last), else Kata's 1024."""
    port = AGENT_VSOCK_PORT
    for word in kernel_params.split():
        name, _, value = word.partition("=")
        if name == AGENT_VSOCK_PORT_PARAM and value.isdigit():
            port = int(value)
    return port


def hybrid_vsock_agent_channel(socket_path: Path, kernel_params: str = "") -> AgentChannel:
    """The agent channel of a VMM whose vsock the host reaches through a Unix socket."""
    return AgentChannel(id="agent", channel=ChannelKind.HYBRID_VSOCK, socket_path=socket_path,
                        port=agent_vsock_port(kernel_params))


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


# -- the one device serialiser, for saved state -----------------------------------------------
_DEVICE_TYPES: dict[DeviceKind, type[Any]] = {
    DeviceKind.BLOCK: BlockDevice,
    DeviceKind.NETWORK: NetworkDevice,
    DeviceKind.AGENT_CHANNEL: AgentChannel,
    DeviceKind.SHARED_FS: SharedFsDevice,
    DeviceKind.VFIO: VfioDevice,
}
_FIELD_TYPES: dict[str, type[Any]] = {"path": Path, "socket_path": Path, "host_path": Path,
                                      "daemon_socket": Path, "channel": ChannelKind, "fs": SharedFsKind}


def device_to_dict(device: AnyDevice) -> dict[str, Any]:
    """JSON-ready: enums as their values, paths as strings, ``kind`` naming the type."""
    return {key: (value.value if isinstance(value, enum.Enum) else str(value) if isinstance(value, Path)
                  else value)
            for key, value in asdict(device).items()}


def device_from_dict(data: dict[str, Any]) -> AnyDevice:
    cls = _DEVICE_TYPES[DeviceKind(data["kind"])]
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {key: (_FIELD_TYPES[key](value) if key in _FIELD_TYPES and value is not None else value)
              for key, value in data.items() if key in names}
    device: AnyDevice = cls(**kwargs)
    return device
