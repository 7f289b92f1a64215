"""What a pod's network namespace offers the VM, as plain values.

``IPAddress``, ``Interface``, ``Route`` and ``ARPNeighbor`` carry exactly the fields of the
guest agent's messages of the same names (protos/containers.proto), so
``containers_pb2.Interface(**dataclasses.asdict(interface))`` is the whole conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kabuto.errors import KabutoError

#: Linux's IFNAMSIZ less the terminating NUL
MAX_IFNAME = 15
#: the config's runtime.internetworking_model values (config/rules.py) this package knows
TCFILTER = "tcfilter"
NONE = "none"
MACVTAP = "macvtap"
L3FORWARDING = "l3forwarding"


class NetworkError(KabutoError):
    """The pod's network namespace cannot be read or connected to the VM."""


class NetnsGone(NetworkError):
    """The path does not name a network namespace (never did, or CNI already deleted it)."""


@dataclass(frozen=True)
class IPAddress:
    address: str  # "10.88.0.5" or "fd00::5"
    prefix_length: int


@dataclass(frozen=True)
class Interface:
    name: str  # as in the pod's netns ("eth0"); the guest NIC takes it
    mac: str  # the guest NIC gets this MAC: the peers' ARP caches already point at it
    addresses: list[IPAddress] = field(default_factory=list)
    mtu: int = 0


@dataclass(frozen=True)
class Route:
    destination: str  # "10.88.0.0/16", or "default"
    gateway: str = ""  # "" for a link route
    device: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_*: 0 universe, 253 link


@dataclass(frozen=True)
class ARPNeighbor:
    ip_address: str
    device: str
    mac: str


@dataclass(frozen=True)
class Endpoint:
    """One interface of the pod's netns worth giving the VM, with what the guest must set up."""

    interface: Interface
    kind: str  # the link kind in the netns: "veth", "macvlan" or "ipvlan"
    routes: list[Route] = field(default_factory=list)
    neighbors: list[ARPNeighbor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.interface.name
