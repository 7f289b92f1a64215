"""The host side of pod networking: what the pod's netns holds, and tap devices joined to it.

The pod's network namespace (made by CNI, a CRI or podman) also holds the VMM. ``scan`` reads
the interfaces worth giving the VM, with the addresses, routes and neighbours the guest agent
then sets up (UpdateInterface, UpdateRoutes, AddARPNeighbors); ``attach`` gives each a tap for
the VMM's virtio-net NIC (which gets the interface's MAC); ``detach``/``detach_all`` undo it.

pyroute2 blocks: these coroutines run it in a worker thread. Each netlink request is answered
by the kernel; entering the netns is bounded by pyroute2 (10 s for the socket's child process,
4 s for the tap's).

pyroute2 is imported with the first of these calls, not with this package: a sandbox without a
pod netns (`kabuto run`, the API) never pays for it (docs/benchmarks.md, cold start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kabuto.runtime.network.model import (
    ARPNeighbor,
    Endpoint,
    Interface,
    IPAddress,
    NetnsGone,
    NetworkError,
    Route,
)
from kabuto.runtime.network.vhost import host_facts, vhost_net_available

if TYPE_CHECKING:
    from kabuto.runtime.network.endpoints import scan
    from kabuto.runtime.network.netns import check_netns
    from kabuto.runtime.network.tcfilter import attach, detach, detach_all

#: what pyroute2 serves: name -> its module, imported on first use
_LAZY = {"scan": "endpoints", "check_netns": "netns", "attach": "tcfilter", "detach": "tcfilter",
         "detach_all": "tcfilter"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ARPNeighbor", "Endpoint", "IPAddress", "Interface", "NetnsGone", "NetworkError", "Route",
    "attach", "check_netns", "detach", "detach_all", "host_facts", "scan", "vhost_net_available",
]
