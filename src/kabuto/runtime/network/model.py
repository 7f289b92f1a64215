"""What a pod's network namespace offers the VM, as plain values.

``IPAddress``, ``Interface``, ``Route`` and ``ARPNeighbor`` are the guest agent client's own
(kabuto.agent.containers): what the scan finds is what UpdateInterface, UpdateRoutes and
AddARPNeighbors send, with no conversion in between.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kabuto.agent.containers import ARPNeighbor, Interface, IPAddress, Route
from kabuto.errors import KabutoError

__all__ = ["ARPNeighbor", "Endpoint", "IPAddress", "Interface", "NetnsGone", "NetworkError", "Route"]

#: the taps tcfilter makes (the scan skips them, detach removes only these)
TAP_NAME = re.compile(r"tap(\d+)_kabuto")
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
class Endpoint:
    """One interface of the pod's netns worth giving the VM, with what the guest must set up."""

    interface: Interface
    kind: str  # the link kind in the netns: "veth", "macvlan" or "ipvlan"
    routes: list[Route] = field(default_factory=list)
    neighbors: list[ARPNeighbor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.interface.name
