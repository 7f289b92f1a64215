"""Kata's tcfilter internetworking: a tap per pod interface, mirrored both ways with tc.

In the pod's netns (where the VMM runs) each endpoint gets a tap ``tap<N>_kabuto``; an ingress
qdisc on the endpoint's interface holds a u32 match-all filter whose action is ``mirred egress
redirect`` to the tap, and the tap's ingress redirects back the same way. Frames from the pod's
network reach the VM unchanged and the VM's NIC, which has the interface's MAC, answers for it;
the interface's addresses and routes stay as CNI left them (the netns' own stack never sees a
frame again: ingress redirect steals them all).

Kabuto's own objects are recognised by name and content alone, so no state is needed to undo
them: a tun device named ``tap<N>_kabuto``, and a u32 filter whose action redirects to one. An
ingress qdisc is Kabuto's to remove once none of its filters remain.

Callers serialise attach per netns (the sandbox lock does): two attaches at once could choose
the same tap number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kabuto.runtime.network.endpoints import find_link, link_kind
from kabuto.runtime.network.model import (
    L3FORWARDING,
    MACVTAP,
    MAX_IFNAME,
    NONE,
    TAP_NAME,
    TCFILTER,
    Endpoint,
    NetnsGone,
    NetworkError,
)
from kabuto.runtime.network.netns import rtnl

log = logging.getLogger(__name__)

# the parent handle of ingress filters: under an ingress qdisc, and under clsact's ingress hook
INGRESS_PARENT = 0xFFFF0000
CLSACT_INGRESS_PARENT = 0xFFFFFFF2
ETH_P_ALL = 0x0003
# linux/tc_act/tc_mirred.h
TCA_EGRESS_REDIR = 1
MATCH_ALL = ["0x0/0x0+0"]


async def attach(netns_path: str, endpoint: Endpoint, model: str = TCFILTER, queues: int = 1) -> str | None:
    """Connect ``endpoint`` to a new tap in the netns; the tap's name (None for model "none").

    ``queues`` > 1 makes a multi-queue tap (the VMM opens it with as many queues). Attaching an
    endpoint that is already attached answers its tap and adds nothing."""
    return await asyncio.to_thread(attach_sync, netns_path, endpoint, model, queues)


async def detach(netns_path: str, tap: str) -> None:
    """Remove what ``attach`` made for ``tap``: the redirects, an ingress qdisc left empty, the tap.
    Nothing to do when the tap or the whole netns is gone already."""
    await asyncio.to_thread(detach_all_sync, netns_path, [tap])


async def detach_all(netns_path: str, taps: Iterable[str]) -> None:
    await asyncio.to_thread(detach_all_sync, netns_path, list(taps))


def tap_name(number: int) -> str:
    name = f"tap{number}_kabuto"
    if len(name) > MAX_IFNAME:
        raise NetworkError(f"tap name {name} is longer than {MAX_IFNAME} characters")
    return name


def attach_sync(netns_path: str, endpoint: Endpoint, model: str = TCFILTER, queues: int = 1) -> str | None:
    """``attach`` for a worker thread."""
    if model == NONE:
        return None
    if model in (MACVTAP, L3FORWARDING):
        raise NetworkError(f"internetworking_model {model!r} is not supported: use {TCFILTER!r} or {NONE!r}")
    if model != TCFILTER:
        raise NetworkError(f"unknown internetworking_model {model!r}")
    name = endpoint.interface.name
    if not name or len(name) > MAX_IFNAME:
        raise NetworkError(f"interface name {name!r} is not 1 to {MAX_IFNAME} characters long")
    if not endpoint.interface.mac:
        raise NetworkError(f"interface {name} has no MAC address for the guest NIC")
    if queues < 1:
        raise NetworkError(f"{name}: queues must be at least 1, not {queues}")
    with rtnl(netns_path) as ipr:
        try:
            link = find_link(ipr, name)
            if link is None:
                raise NetworkError(f"{netns_path}: no interface {name}")
            if link.get("address") != endpoint.interface.mac:
                raise NetworkError(f"{netns_path}: interface {name} has MAC {link.get('address')}, "
                                   f"not {endpoint.interface.mac} as scanned")
            return _connect(ipr, link, queues)
        except NetlinkError as exc:
            raise NetworkError(f"{netns_path}: connecting {name} to a tap: {exc.args[-1]}") from exc


def detach_all_sync(netns_path: str, taps: list[str]) -> None:
    """``detach_all`` for a worker thread: every tap is tried; the first failure is raised."""
    for tap in taps:
        if not TAP_NAME.fullmatch(tap):
            raise NetworkError(f"{tap!r} is not a tap Kabuto made (tap<N>_kabuto)")
    try:
        with rtnl(netns_path) as ipr:
            failures = []
            for tap in taps:
                try:
                    _disconnect(ipr, tap)
                except (NetlinkError, NetworkError) as exc:
                    failures.append(f"{tap}: {exc.args[-1]}")
    except NetnsGone:
        log.debug("%s is gone: its taps went with it", netns_path)
        return
    if failures:
        raise NetworkError(f"{netns_path}: detaching " + "; ".join(failures))


def _connect(ipr: IPRoute, link: Any, queues: int) -> str:
    veth = link["index"]
    existing = _attached_tap(ipr, veth)
    undo: list[Callable[[], object]] = []
    try:
        if existing is not None:
            tap, name = existing["index"], existing.get("ifname")
            if _multi_queue(existing) != (queues > 1):
                raise NetworkError(f"{name} is attached already, with multi_queue {_multi_queue(existing)} "
                                   f"(not for {queues} queues)")
        else:
            name = tap_name(_free_number(ipr))
            flags = {"no_pi": 1, "vnet_hdr": 1, "multi_queue": int(queues > 1)}
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=0, gid=0, ifr=flags)
            tap = ipr.link_lookup(ifname=name)[0]
            undo.append(lambda: ipr.link("del", index=tap))  # its qdisc and filters go with it
        ipr.link("set", index=tap, mtu=link.get("mtu"), state="up")
        undo += _redirect(ipr, tap, veth)
        # the pod's side last: its traffic moves only once the way back exists
        undo += _redirect(ipr, veth, tap)
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(NetlinkError):
                step()
        raise
    log.info("%s <-> %s: redirected with tc", link.get("ifname"), name)
    return name


def _disconnect(ipr: IPRoute, name: str) -> None:
    tap = find_link(ipr, name)
    if tap is None:
        return
    if link_kind(tap) != "tun":
        raise NetworkError(f"{name} is a {link_kind(tap) or 'device'} interface, not a tap Kabuto made")
    for index, parent, msg in _redirects(ipr):
        if tap["index"] in _mirred_targets(msg) and index != tap["index"]:
            _drop_filter(ipr, index, parent, msg)
            if parent == INGRESS_PARENT and not _filters(ipr, index, parent):
                ipr.tc("del", "ingress", index)
    ipr.link("del", index=tap["index"])


def _attached_tap(ipr: IPRoute, veth: int) -> Any | None:
    """The Kabuto tap either half of an earlier attach of ``veth`` points at, or None."""
    for index, _parent, msg in _redirects(ipr):
        for target in _mirred_targets(msg):
            candidate = target if index == veth else index if target == veth else None
            if candidate is None:
                continue
            links = ipr.get_links(candidate)
            if links and link_kind(links[0]) == "tun" and TAP_NAME.fullmatch(links[0].get("ifname", "")):
                return links[0]
    return None


def _multi_queue(tap: Any) -> bool:
    data = tap.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
    return bool(data and data.get("IFLA_TUN_MULTI_QUEUE"))


def _free_number(ipr: IPRoute) -> int:
    taken = {int(m.group(1)) for link in ipr.get_links() if (m := TAP_NAME.fullmatch(link.get("ifname", "")))}
    return next(n for n in range(len(taken) + 1) if n not in taken)


def _redirect(ipr: IPRoute, source: int, target: int) -> list[Callable[[], object]]:
    """Make sure frames arriving on ``source`` leave by ``target``; the steps that undo it."""
    parent, created = _ingress(ipr, source)
    undo: list[Callable[[], object]] = []
    if created:
        undo.append(lambda: ipr.tc("del", "ingress", source))
    if any(target in _mirred_targets(m) for m in _filters(ipr, source, parent)):
        return undo
    ipr.tc("add-filter", "u32", source, parent=parent, protocol=ETH_P_ALL, keys=MATCH_ALL, target=0,
           action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target})
    if not created:  # else the qdisc takes the filter with it
        undo.append(lambda: _drop_redirects(ipr, source, parent, target))
    return undo


def _ingress(ipr: IPRoute, index: int) -> tuple[int, bool]:
    """The parent handle for ingress filters on ``index``, adding an ingress qdisc if it has
    neither that nor a clsact one; and whether it was added."""
    for qdisc in ipr.get_qdiscs(index):
        kind = qdisc.get("TCA_KIND")
        if kind == "ingress":
            return INGRESS_PARENT, False
        if kind == "clsact":
            return CLSACT_INGRESS_PARENT, False
    ipr.tc("add", "ingress", index, "ffff:")
    return INGRESS_PARENT, True


def _redirects(ipr: IPRoute, only: int | None = None) -> list[tuple[int, int, Any]]:
    """(ifindex, parent, filter message) of every ingress filter that redirects somewhere."""
    found = []
    for qdisc in ipr.get_qdiscs(only):
        index, kind = qdisc["index"], qdisc.get("TCA_KIND")
        if kind not in ("ingress", "clsact") or (only is not None and index != only):
            continue
        parent = INGRESS_PARENT if kind == "ingress" else CLSACT_INGRESS_PARENT
        found += [(index, parent, m) for m in _filters(ipr, index, parent) if _mirred_targets(m)]
    return found


def _filters(ipr: IPRoute, index: int, parent: int) -> list[Any]:
    """The filters under ``parent`` that match something (u32 lists its hash tables too)."""
    return [m for m in ipr.get_filters(index, parent=parent) if _is_rule(m)]


def _mirred_targets(msg: Any) -> list[int]:
    """The interfaces a u32 filter's mirred egress-redirect actions send to."""
    if msg.get("TCA_KIND") != "u32":
        return []
    options = msg.get("TCA_OPTIONS")
    actions = options.get("TCA_U32_ACT") if options else None
    targets = []
    for _name, action in (actions or {}).get("attrs", []):
        params = action.get("TCA_ACT_OPTIONS")
        parms = params.get("TCA_MIRRED_PARMS") if params and action.get("TCA_ACT_KIND") == "mirred" else None
        if parms and parms["eaction"] == TCA_EGRESS_REDIR:
            targets.append(parms["ifindex"])
    return targets


def _drop_redirects(ipr: IPRoute, index: int, parent: int, target: int) -> None:
    for msg in _filters(ipr, index, parent):
        if target in _mirred_targets(msg):
            _drop_filter(ipr, index, parent, msg)


def _drop_filter(ipr: IPRoute, index: int, parent: int, msg: Any) -> None:
    """Delete one u32 filter; with the last of its priority, the priority (u32's hash table for
    it stays behind otherwise)."""
    info = msg["info"]  # prio << 16 | protocol in network order
    last = [m["handle"] for m in _filters(ipr, index, parent) if m["info"] == info] == [msg["handle"]]
    ipr.tc("del-filter", "u32", index, parent=parent, handle=0 if last else msg["handle"], prio=info >> 16,
           protocol=socket.ntohs(info & 0xFFFF), target=0)


def _is_rule(msg: Any) -> bool:
    options = msg.get("TCA_OPTIONS")
    return options is not None and (msg.get("TCA_KIND") != "u32" or options.get("TCA_U32_SEL") is not None)
