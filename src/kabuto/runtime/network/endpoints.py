"""Scanning a pod's network namespace for the interfaces to give the VM (Kata's endpoint scan).

Handled: veth (what CNI's bridge, ptp and most plugins leave), macvlan and ipvlan: with the
tcfilter model each is a netdev whose ingress is redirected to a tap, whatever its kind.
Skipped: lo, Kabuto's own taps, and, like Kata, any interface with no address but an IPv6
link-local one (unconfigured). Refused by name: any other interface with an address (a physical
NIC, which Kata passes through with VFIO; a tap not Kabuto's; a bridge, dummy or tunnel): its
address would silently be missing in the VM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kabuto.runtime.network.model import (
    TAP_NAME,
    ARPNeighbor,
    Endpoint,
    Interface,
    IPAddress,
    NetworkError,
    Route,
)
from kabuto.runtime.network.netns import rtnl

log = logging.getLogger(__name__)

CONNECTABLE_KINDS = ("veth", "macvlan", "ipvlan")
LOOPBACK = "lo"
# linux/rtnetlink.h, linux/neighbour.h
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
NO_MAC = "00:00:00:00:00:00"


async def scan(netns_path: str) -> list[Endpoint]:
    """The endpoints of the netns at ``netns_path``, in interface index order.

    NetnsGone when the path names no network namespace."""
    return await asyncio.to_thread(scan_sync, netns_path)


def scan_sync(netns_path: str) -> list[Endpoint]:
    """``scan`` for a worker thread."""
    with rtnl(netns_path) as ipr:
        try:
            links = sorted(ipr.get_links(), key=lambda link: link["index"])
            addresses = list(ipr.get_addr())
            routes = [*ipr.get_routes(family=AF_INET), *ipr.get_routes(family=AF_INET6)]
            neighbours = list(ipr.get_neighbours())
        except NetlinkError as exc:
            raise NetworkError(f"{netns_path}: reading its interfaces: {exc.args[-1]}") from exc
    endpoints = []
    for link in links:
        name, kind = link.get("ifname"), link_kind(link)
        index = link["index"]
        if name == LOOPBACK or (kind == "tun" and TAP_NAME.fullmatch(name or "")):
            continue
        addrs = [a for a in map(_address, (m for m in addresses if m["index"] == index)) if a]
        if not addrs:
            log.debug("%s: skipping %s: no address", netns_path, name)
            continue
        if kind not in CONNECTABLE_KINDS:
            raise NetworkError(f"{netns_path}: interface {name} ({kind or 'a physical device'}) has an "
                               f"address but cannot be mirrored into the VM: only "
                               f"{', '.join(CONNECTABLE_KINDS)} interfaces can")
        mac = link.get("address") or ""
        if mac in ("", NO_MAC):
            raise NetworkError(f"{netns_path}: interface {name} has no MAC address for the guest NIC")
        iface = Interface(name=name, mac=mac, addresses=addrs, mtu=link.get("mtu") or 0)
        own = [r for r in (_route(m, name) for m in routes if m.get("RTA_OIF") == index) if r]
        # link routes first: a gateway must be reachable when its route is added
        own.sort(key=lambda r: r.gateway != "")
        neigh = [n for n in (_neighbour(m, name) for m in neighbours if m["ifindex"] == index) if n]
        endpoints.append(Endpoint(interface=iface, kind=kind, routes=own, neighbors=neigh))
    return endpoints


def link_kind(link: Any) -> str:
    info = link.get("IFLA_LINKINFO")
    return (info.get("IFLA_INFO_KIND") if info else None) or ""


def _address(msg: Any) -> IPAddress | None:
    # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on point-to-point links)
    address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    if not address or msg["family"] not in (AF_INET, AF_INET6):
        return None
    if msg["family"] == AF_INET6 and ipaddress.ip_address(address).is_link_local:
        return None  # the guest derives the same one from the same MAC
    return IPAddress(address=address, prefix_length=msg["prefixlen"])


def _route(msg: Any, device: str) -> Route | None:
    """A main-table unicast route out of ``device`` (a multipath route has no RTA_OIF: not
    given), or None."""
    if msg.get("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN or msg["type"] != RTN_UNICAST:
        return None
    dst = msg.get("RTA_DST")
    if msg["family"] == AF_INET6 and dst and ipaddress.ip_address(dst).is_link_local:
        return None  # fe80::/64 comes with the guest NIC
    destination = f"{dst}/{msg['dst_len']}" if msg["dst_len"] else "default"
    return Route(destination=destination, gateway=msg.get("RTA_GATEWAY") or "", device=device,
                 source=msg.get("RTA_PREFSRC") or "", scope=msg["scope"])


def _neighbour(msg: Any, device: str) -> ARPNeighbor | None:
    """A permanent neighbour entry (what CNI or the admin pinned), or None."""
    ip, mac = msg.get("NDA_DST"), msg.get("NDA_LLADDR")
    if not (msg["state"] & NUD_PERMANENT) or not ip or not mac:
        return None
    return ARPNeighbor(ip_address=ip, device=device, mac=mac)


def find_link(ipr: IPRoute, name: str) -> Any | None:
    """The link named ``name`` in the socket's netns, or None."""
    found = ipr.link_lookup(ifname=name)
    return ipr.get_links(found[0])[0] if found else None
