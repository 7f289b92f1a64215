"""The pod's network in the guest, as the host asks (Kata's UpdateInterface, UpdateRoutes,
AddARPNeighbors): every container shares the guest's network namespace, which holds the
pod's NICs. Each request is checked and bounded before anything changes; netlink.py talks
to the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket

from kabuto.guest import netlink
from kabuto.guest.containers.deadlines import deadline_within
from kabuto.protos import containers_pb2 as pb
from kabuto.ttrpc import Code, RpcError

MAX_ADDRESSES = 64  # per interface: 16 interfaces' worth of a v4 and a few v6 each
MAX_ROUTES = 256
MAX_NEIGHBORS = 256
IFNAMSIZ = 16  # with its NUL
MIN_MTU, MAX_MTU = 68, 65535  # IPv4's minimum; the device may allow less (the kernel says)
# A NIC hot-plugged just before the call may not be bound yet.
NIC_WAIT = 10.0
NIC_POLL_INTERVAL = 0.05
# a NIC hot-plugged a moment ago may still lack its carrier when set up: a container started at
# once would find eth0 down; wait for it this long, then answer anyway (a carrier the host keeps
# down is the host's to give)
CARRIER_WAIT = 5.0
LOOPBACK = "lo"
MAC_PATTERN = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")

_ERRNO_CODES = {
    errno.ENODEV: Code.NOT_FOUND,
    errno.ENOENT: Code.NOT_FOUND,
    errno.ESRCH: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.ERANGE: Code.INVALID_ARGUMENT,
    errno.EADDRNOTAVAIL: Code.INVALID_ARGUMENT,
    errno.ENETUNREACH: Code.FAILED_PRECONDITION,  # a gateway no link route reaches
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.ETIMEDOUT: Code.DEADLINE_EXCEEDED,
}


def _rpc_error(exc: OSError) -> RpcError:
    return RpcError(_ERRNO_CODES.get(exc.errno or 0, Code.INTERNAL), str(exc))


def check_name(name: str, what: str) -> str:
    # as the kernel's dev_valid_name: no "/", ":" or space, not "." or ".."
    if not 0 < len(name.encode()) < IFNAMSIZ or name in (".", "..") or re.search(r"[/:\s\0]", name):
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {name[:64]!r} is not an interface name")
    if name == LOOPBACK:
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {name!r}: lo is the guest's own")
    return name


def check_mac(mac: str, what: str) -> str:
    if not MAC_PATTERN.fullmatch(mac):
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {mac[:64]!r} is not a MAC address")
    return mac.lower()


def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} {text[:64]!r} is not an IP address") from None


def _family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def check_address(address: pb.IPAddress, index: int) -> netlink.Address:
    ip = _ip(address.address, "address")
    if not 0 < address.prefix_length <= ip.max_prefixlen:
        raise RpcError(
            Code.INVALID_ARGUMENT,
            f"address {ip}: prefix length {address.prefix_length} is not in 1..{ip.max_prefixlen}",
        )
    return netlink.Address(index, _family(ip), str(ip), address.prefix_length)


def _link_by_name(links: list[netlink.Link], name: str) -> netlink.Link:
    for link in links:
        if link.name == name:
            return link
    raise RpcError(Code.NOT_FOUND, f"no interface {name!r} in the guest")


async def _find_nic(mac: str) -> netlink.Link:
    """The link with ``mac``, waiting (bounded) for a NIC still being hot-plugged."""
    loop = asyncio.get_running_loop()
    deadline = deadline_within(NIC_WAIT)
    while True:
        with netlink.Netlink() as nl:
            found = [link for link in nl.links() if link.mac == mac]
        if len(found) > 1:
            names = ", ".join(link.name for link in found)
            raise RpcError(Code.FAILED_PRECONDITION, f"more than one guest interface has MAC {mac}: {names}")
        if found:
            return found[0]
        if loop.time() + NIC_POLL_INTERVAL > deadline:
            raise RpcError(Code.NOT_FOUND, f"no guest interface has MAC {mac} (waited {NIC_WAIT:g}s)")
        await asyncio.sleep(NIC_POLL_INTERVAL)


def _is_link_local_v6(address: netlink.Address) -> bool:
    return address.family == socket.AF_INET6 and ipaddress.ip_address(address.address).is_link_local


def describe_interface(nl: netlink.Netlink, index: int) -> pb.Interface:
    link = nl.link(index)
    return pb.Interface(
        name=link.name,
        mac=link.mac,
        mtu=link.mtu,
        addresses=[
            pb.IPAddress(address=a.address, prefix_length=a.prefix_length) for a in nl.addresses(index)
        ],
    )


async def update_interface(request: pb.UpdateInterfaceRequest) -> pb.Interface:
    wanted = request.interface
    name = check_name(wanted.name, "interface name")
    mac = check_mac(wanted.mac, "interface MAC")
    if len(wanted.addresses) > MAX_ADDRESSES:
        raise RpcError(Code.INVALID_ARGUMENT, f"at most {MAX_ADDRESSES} addresses per interface")
    if wanted.mtu and not MIN_MTU <= wanted.mtu <= MAX_MTU:
        raise RpcError(Code.INVALID_ARGUMENT, f"MTU {wanted.mtu} is not in {MIN_MTU}..{MAX_MTU}")
    addresses = [check_address(a, 0) for a in wanted.addresses]
    link = await _find_nic(mac)
    if link.name == LOOPBACK:
        raise RpcError(Code.INVALID_ARGUMENT, "lo is the guest's own: not altered")
    addresses = [netlink.Address(link.index, a.family, a.address, a.prefix_length) for a in addresses]
    try:
        with netlink.Netlink() as nl:
            if link.name != name:
                if any(other.name == name for other in nl.links()):
                    raise RpcError(Code.ALREADY_EXISTS, f"another guest interface is named {name!r}")
                nl.set_link(link.index, up=False)  # the kernel renames only a link that is down
                nl.set_link(link.index, name=name)
            if wanted.mtu:
                nl.set_link(link.index, mtu=wanted.mtu)
            keep = {(a.family, a.address, a.prefix_length) for a in addresses}
            for old in nl.addresses(link.index):
                # the kernel's IPv6 link-local address (NDP needs one) stays unless replaced
                if (old.family, old.address, old.prefix_length) not in keep and not _is_link_local_v6(old):
                    nl.delete_address(old)
            for address in addresses:
                nl.add_address(address)
            nl.set_link(link.index, up=True)
        await _wait_for_carrier(link.index)
        with netlink.Netlink() as nl:
            return describe_interface(nl, link.index)
    except OSError as exc:
        raise _rpc_error(exc) from None


async def _wait_for_carrier(index: int) -> None:
    deadline = deadline_within(CARRIER_WAIT)
    loop = asyncio.get_running_loop()
    while loop.time() + NIC_POLL_INTERVAL <= deadline:
        with netlink.Netlink() as nl:
            if nl.link(index).running:
                return
        await asyncio.sleep(NIC_POLL_INTERVAL)


# --- routes ---------------------------------------------------------------------------


def _route_entry(route: pb.Route, links: list[netlink.Link], i: int) -> netlink.RouteEntry:
    where = f"routes[{i}]"
    if not route.device:
        raise RpcError(Code.INVALID_ARGUMENT, f"{where}: no device")
    if route.device == LOOPBACK:
        raise RpcError(Code.INVALID_ARGUMENT, f"{where}: lo's routes are the guest's own")
    check_name(route.device, f"{where}.device")
    link = _link_by_name(links, route.device)
    gateway = _ip(route.gateway, f"{where}.gateway") if route.gateway else None
    source = _ip(route.source, f"{where}.source") if route.source else None
    destination = ""
    family = None
    if route.destination not in ("", "default"):
        try:
            network = ipaddress.ip_network(route.destination)
        except ValueError:
            raise RpcError(
                Code.INVALID_ARGUMENT, f"{where}.destination {route.destination[:64]!r} is not a network"
            ) from None
        family = socket.AF_INET6 if network.version == 6 else socket.AF_INET
        destination = str(network) if network.prefixlen else ""
    families = {_family(ip) for ip in (gateway, source) if ip is not None} | ({family} if family else set())
    if len(families) > 1:
        raise RpcError(Code.INVALID_ARGUMENT, f"{where}: IPv4 and IPv6 mixed")
    if not families:
        raise RpcError(Code.INVALID_ARGUMENT, f"{where}: a default route needs a gateway")
    if not 0 <= route.scope < 255:  # 255 is RT_SCOPE_NOWHERE
        raise RpcError(Code.INVALID_ARGUMENT, f"{where}.scope {route.scope} is not a route scope")
    return netlink.RouteEntry(
        family=families.pop(),
        destination=destination,
        gateway=str(gateway or ""),
        index=link.index,
        source=str(source or ""),
        scope=route.scope,
        protocol=netlink.RTPROT_STATIC,
    )


def _route_message(entry: netlink.RouteEntry, names: dict[int, str]) -> pb.Route:
    return pb.Route(
        destination=entry.destination or "default",
        gateway=entry.gateway,
        device=names.get(entry.index, ""),
        source=entry.source,
        scope=entry.scope,
    )


async def update_routes(request: pb.UpdateRoutesRequest) -> pb.UpdateRoutesResponse:
    """The main table's routes on the devices named become these; the kernel's own (an
    address's prefix route, IPv6 link-local) stay, as Kata's agent leaves them."""
    if len(request.routes) > MAX_ROUTES:
        raise RpcError(Code.INVALID_ARGUMENT, f"at most {MAX_ROUTES} routes")
    try:
        with netlink.Netlink() as nl:
            links = nl.links()
            entries = [_route_entry(route, links, i) for i, route in enumerate(request.routes)]
            devices = {entry.index for entry in entries}
            for old in nl.routes():
                if old.index in devices and old.protocol != netlink.RTPROT_KERNEL:
                    nl.delete_route(old)
            # link routes first: a gateway must be reachable when its route is added
            for entry in sorted(entries, key=lambda e: bool(e.gateway)):
                nl.add_route(entry)
            names = {link.index: link.name for link in links}
            return pb.UpdateRoutesResponse(
                routes=[_route_message(entry, names) for entry in nl.routes() if entry.index in devices]
            )
    except OSError as exc:
        raise _rpc_error(exc) from None


async def add_arp_neighbors(request: pb.AddARPNeighborsRequest) -> pb.AddARPNeighborsResponse:
    if len(request.neighbors) > MAX_NEIGHBORS:
        raise RpcError(Code.INVALID_ARGUMENT, f"at most {MAX_NEIGHBORS} neighbours")
    try:
        with netlink.Netlink() as nl:
            links = nl.links()
            checked = []
            for i, neighbor in enumerate(request.neighbors):
                where = f"neighbors[{i}]"
                ip = _ip(neighbor.ip_address, f"{where}.ip_address")
                mac = check_mac(neighbor.mac, f"{where}.mac")
                link = _link_by_name(links, check_name(neighbor.device, f"{where}.device"))
                checked.append((link.index, str(ip), bytes.fromhex(mac.replace(":", ""))))
            for index, ip_text, raw_mac in checked:
                nl.add_neighbor(index, ip_text, raw_mac)
    except OSError as exc:
        raise _rpc_error(exc) from None
    return pb.AddARPNeighborsResponse()
