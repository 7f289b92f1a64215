"""rtnetlink (NETLINK_ROUTE) over a plain AF_NETLINK socket: links, addresses, routes, neighbours.

The guest has no pyroute2, and busybox ``ip`` would cost a fork per step (about 10 ms each
under TCG) and output to parse; the kernel's own messages, packed with struct, are few and
stable. Every call is synchronous and bounded by the socket's timeout: rtnetlink answers
in the sender's context, so an answer is there as soon as the request is sent.

Failures raise OSError with the kernel's errno and what was asked.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

TIMEOUT = 5.0
RECV_SIZE = 1 << 16
MAX_DUMP_MESSAGES = 1 << 16  # bounds a dump: far more than a guest has links, addresses or routes

# linux/netlink.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# linux/rtnetlink.h
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
# what names a route to delete (the kernel's others, e.g. RTA_CACHEINFO, are not for requests)
ROUTE_KEYS = (RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE)
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_STATIC = 2, 4
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
IFF_UP = 0x1
IFF_RUNNING = 0x40  # operstate up: the device has its carrier

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")  # rtattr: length, type


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str  # lower case, "" when the link has none
    mtu: int
    up: bool
    running: bool = False


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    address: str
    prefix_length: int


@dataclass(frozen=True)
class RouteEntry:
    family: int
    destination: str  # "" for the default route, else "network/prefix"
    gateway: str
    index: int  # the output interface, 0 when none
    source: str
    scope: int
    protocol: int
    key: bytes = field(repr=False, default=b"")  # the kernel's rtmsg and attributes naming it


def _align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (_align(length) - length)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            break
        attrs.setdefault(kind & 0x3FFF, data[offset + _ATTR.size : offset + length])  # no NLA_F_* bits
        offset += _align(length)
    return attrs


def pack_ip(family: int, text: str) -> bytes:
    return socket.inet_pton(family, text)


def family_of(text: str) -> int:
    return socket.AF_INET6 if ":" in text else socket.AF_INET


def _ip(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Netlink:
    """One NETLINK_ROUTE socket; use as a context manager."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self._socket.settimeout(TIMEOUT)
        self._socket.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, kind: int, flags: int, payload: bytes) -> int:
        self._seq += 1
        self._socket.send(
            _HEADER.pack(_HEADER.size + len(payload), kind, flags | NLM_F_REQUEST, self._seq, 0) + payload
        )
        return self._seq

    def _answers(self, seq: int, what: str) -> list[tuple[int, bytes]]:
        """The messages answering ``seq`` up to its ack or end of dump (an error raises)."""
        found: list[tuple[int, bytes]] = []
        while len(found) < MAX_DUMP_MESSAGES:
            try:
                data = self._socket.recv(RECV_SIZE)
            except TimeoutError:
                raise OSError(errno.ETIMEDOUT, f"{what}: no answer from the kernel in {TIMEOUT:g}s") from None
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, msg_seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size or offset + length > len(data):
                    raise OSError(errno.EPROTO, f"{what}: a truncated netlink message")
                body = data[offset + _HEADER.size : offset + length]
                offset += _align(length)
                if msg_seq != seq:
                    continue  # a late answer to an earlier request that timed out
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", body)
                    if code:
                        raise OSError(-code, f"{what}: {os.strerror(-code)}")
                    return found
                found.append((kind, body))
        raise OSError(errno.E2BIG, f"{what}: more than {MAX_DUMP_MESSAGES} answers")

    def request(self, kind: int, flags: int, payload: bytes, what: str) -> None:
        self._answers(self._send(kind, flags | NLM_F_ACK, payload), what)

    def dump(self, kind: int, payload: bytes, what: str) -> list[bytes]:
        return [body for _, body in self._answers(self._send(kind, NLM_F_DUMP, payload), what)]

    # --- links ------------------------------------------------------------------------

    def links(self) -> list[Link]:
        links = []
        for body in self.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0), "list links"):
            _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
            attrs = parse_attrs(body[_IFINFO.size :])
            name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
            mtu = struct.unpack("=I", attrs[IFLA_MTU])[0] if len(attrs.get(IFLA_MTU, b"")) == 4 else 0
            links.append(Link(index, name, _mac(attrs.get(IFLA_ADDRESS, b"")), mtu, bool(flags & IFF_UP),
                              bool(flags & IFF_RUNNING)))
        return links

    def link(self, index: int) -> Link:
        for link in self.links():
            if link.index == index:
                return link
        raise OSError(errno.ENODEV, f"no link with index {index}")

    def set_link(
        self, index: int, *, up: bool | None = None, name: str | None = None, mtu: int | None = None
    ) -> None:
        attrs = b""
        if name is not None:
            attrs += attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu is not None:
            attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
        flags, change = (0, 0) if up is None else (IFF_UP if up else 0, IFF_UP)
        what = f"set link {index}" + (f" name {name}" if name else "") + (f" mtu {mtu}" if mtu else "")
        if up is not None:
            what += " up" if up else " down"
        self.request(RTM_NEWLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs, what)

    # --- addresses --------------------------------------------------------------------

    def addresses(self, index: int) -> list[Address]:
        found = []
        for body in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0), "list addresses"):
            family, prefix_length, _flags, _scope, addr_index = _IFADDR.unpack_from(body)
            attrs = parse_attrs(body[_IFADDR.size :])
            # IFA_LOCAL is the address itself; IFA_ADDRESS the peer's on point-to-point links
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if addr_index == index and raw and family in (socket.AF_INET, socket.AF_INET6):
                found.append(Address(index, family, _ip(family, raw), prefix_length))
        return found

    def _address(self, kind: int, flags: int, address: Address, what: str) -> None:
        raw = pack_ip(address.family, address.address)
        attrs = attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        if address.family == socket.AF_INET6:
            # the pod's netns already owns the address: no duplicate detection to wait for
            # before containers can bind it
            attrs = attr(IFA_ADDRESS, raw) + attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
        header = _IFADDR.pack(address.family, address.prefix_length, 0, RT_SCOPE_UNIVERSE, address.index)
        self.request(kind, flags, header + attrs, f"{what} {address.address}/{address.prefix_length}")

    def add_address(self, address: Address) -> None:
        self._address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, address, "add address")

    def delete_address(self, address: Address) -> None:
        self._address(RTM_DELADDR, 0, address, "delete address")

    # --- routes -----------------------------------------------------------------------

    def routes(self) -> list[RouteEntry]:
        """The main table's unicast routes, IPv4 and IPv6."""
        found = []
        for body in self.dump(
            RTM_GETROUTE, _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0), "list routes"
        ):
            family, dst_len, _src_len, _tos, table, protocol, scope, kind, _flags = _RTMSG.unpack_from(body)
            attrs = parse_attrs(body[_RTMSG.size :])
            if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) == 4:
                table = struct.unpack("=I", attrs[RTA_TABLE])[0]
            if (
                table != RT_TABLE_MAIN
                or kind != RTN_UNICAST
                or family not in (socket.AF_INET, socket.AF_INET6)
            ):
                continue
            destination = f"{_ip(family, attrs[RTA_DST])}/{dst_len}" if RTA_DST in attrs else ""
            index = struct.unpack("=i", attrs[RTA_OIF])[0] if len(attrs.get(RTA_OIF, b"")) == 4 else 0
            found.append(
                RouteEntry(
                    family=family,
                    destination=destination,
                    gateway=_ip(family, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else "",
                    index=index,
                    source=_ip(family, attrs[RTA_PREFSRC]) if RTA_PREFSRC in attrs else "",
                    scope=scope,
                    protocol=protocol,
                    key=body[: _RTMSG.size] + b"".join(attr(k, attrs[k]) for k in ROUTE_KEYS if k in attrs),
                )
            )
        return found

    def delete_route(self, route: RouteEntry) -> None:
        # the kernel's own header and keys name exactly this route (metric, table...)
        self.request(
            RTM_DELROUTE, 0, route.key, f"delete route {route.destination or 'default'} dev {route.index}"
        )

    def add_route(self, route: RouteEntry) -> None:
        dst_len = int(route.destination.rsplit("/", 1)[1]) if route.destination else 0
        attrs = attr(RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN)) + attr(
            RTA_OIF, struct.pack("=i", route.index)
        )
        if route.destination:
            attrs += attr(RTA_DST, pack_ip(route.family, route.destination.rsplit("/", 1)[0]))
        if route.gateway:
            attrs += attr(RTA_GATEWAY, pack_ip(route.family, route.gateway))
        if route.source:
            attrs += attr(RTA_PREFSRC, pack_ip(route.family, route.source))
        header = _RTMSG.pack(
            route.family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, route.scope, RTN_UNICAST, 0
        )
        what = f"add route {route.destination or 'default'}" + (
            f" via {route.gateway}" if route.gateway else ""
        )
        # replace: a route the kernel made for an address (the same prefix) becomes this one
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, header + attrs, what + f" dev {route.index}")

    # --- neighbours -------------------------------------------------------------------

    def add_neighbor(self, index: int, ip_address: str, mac: bytes) -> None:
        family = family_of(ip_address)
        attrs = attr(NDA_DST, pack_ip(family, ip_address)) + attr(NDA_LLADDR, mac)
        header = _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0)
        self.request(
            RTM_NEWNEIGH,
            NLM_F_CREATE | NLM_F_REPLACE,
            header + attrs,
            f"add neighbour {ip_address} lladdr {_mac(mac)} dev {index}",
        )


def loopback_up() -> None:
    """Bring lo up: without it a container has no 127.0.0.1 (nothing else does it in the guest)."""
    with Netlink() as netlink:
        netlink.set_link(socket.if_nametoindex("lo"), up=True)
