"""runtime/network against real network namespaces: a pod netns holding eth0 (a veth with an
address, routes and a permanent neighbour, as CNI's bridge plugin leaves it) whose peer sits in a
second netns, so the host's own netns is never touched."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_helpers import in_netns, jq, needs_netns, netns, path, sh

from kabuto.protos import containers_pb2
from kabuto.runtime import network
from kabuto.runtime.network import (
    ARPNeighbor,
    Endpoint,
    Interface,
    IPAddress,
    NetnsGone,
    NetworkError,
    Route,
    tcfilter,
)
from kabuto.runtime.network.vhost import vhost_net_available

POD_IP, PEER_IP, PREFIX = "198.18.0.2", "198.18.0.1", 24
POD_IP6 = "fd00:6b62::2"
NEIGHBOUR_IP, NEIGHBOUR_MAC = "198.18.0.9", "02:6b:62:00:00:09"
MTU = 1400
# linux/if_tun.h
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


@dataclass
class Pod:
    name: str  # the pod's netns
    peer: str  # the netns across eth0's veth, where CNI's bridge would be
    mac: str

    @property
    def path(self) -> str:
        return path(self.name)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with netns() as name, netns() as peer:
        sh("ip", "-n", peer, "link", "add", "peer0", "mtu", str(MTU), "type", "veth",
           "peer", "name", "eth0", "mtu", str(MTU), "netns", name)
        sh("ip", "-n", peer, "addr", "add", f"{PEER_IP}/{PREFIX}", "dev", "peer0")
        sh("ip", "-n", peer, "link", "set", "peer0", "up")
        sh("ip", "-n", name, "addr", "add", f"{POD_IP}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", name, "addr", "add", f"{POD_IP6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "route", "add", "default", "via", PEER_IP, "dev", "eth0")
        sh("ip", "-n", name, "route", "add", "198.19.0.0/16", "via", PEER_IP, "src", POD_IP)
        sh("ip", "-n", name, "neigh", "add", NEIGHBOUR_IP, "lladdr", NEIGHBOUR_MAC, "dev", "eth0",
           "nud", "permanent")
        mac = jq("ip", "-j", "-n", name, "link", "show", "eth0")[0]["address"]
        yield Pod(name, peer, mac)


def links(name: str) -> dict[str, dict]:
    """The links of netns ``name``, by name, with their details."""
    return {link["ifname"]: link for link in jq("ip", "-d", "-j", "-n", name, "link", "show")}


def ingress_filters(pod: Pod, dev: str, stats: bool = False) -> list[dict]:
    """The filters with actions under ``dev``'s ingress (u32 lists its hash tables too)."""
    options = ["-s", "-j"] if stats else ["-j"]
    shown = jq("tc", *options, "-n", pod.name, "filter", "show", "dev", dev, "ingress")
    return [f for f in shown if f.get("options", {}).get("actions")]


def redirect_targets(pod: Pod, dev: str) -> list[str]:
    return [a["to_dev"] for f in ingress_filters(pod, dev) for a in f["options"]["actions"]
            if a["kind"] == "mirred" and a["mirred_action"] == "redirect" and a["direction"] == "egress"]


def qdiscs(pod: Pod, dev: str) -> list[str]:
    return [q["kind"] for q in jq("tc", "-j", "-n", pod.name, "qdisc", "show", "dev", dev)]


def pod_state(pod: Pod) -> dict[str, object]:
    """What CNI made and Kabuto must leave as it was."""
    return {what: jq("ip", "-j", "-n", pod.name, *args) for what, args in {
        "addr": ("addr", "show"), "route": ("route", "show"), "route6": ("-6", "route", "show"),
        "neigh": ("neigh", "show", "nud", "permanent")}.items()} | {"qdisc": qdiscs(pod, "eth0")}


# -- scan


@needs_netns
async def test_scan_reads_the_interface_its_routes_and_neighbours(pod: Pod) -> None:
    endpoints = await network.scan(pod.path)
    assert endpoints == [Endpoint(
        interface=Interface(name="eth0", mac=pod.mac, mtu=MTU,
                            addresses=[IPAddress(POD_IP, PREFIX), IPAddress(POD_IP6, 64)]),
        kind="veth",
        routes=[Route("198.18.0.0/24", "", "eth0", POD_IP, 253),
                Route("fd00:6b62::/64", "", "eth0", "", 0),
                Route("default", PEER_IP, "eth0", "", 0),
                Route("198.19.0.0/16", PEER_IP, "eth0", POD_IP, 0)],
        neighbors=[ARPNeighbor(NEIGHBOUR_IP, "eth0", NEIGHBOUR_MAC)])]


@needs_netns
async def test_scan_takes_macvlan_and_skips_lo_its_taps_and_unconfigured(pod: Pod) -> None:
    sh("ip", "-n", pod.name, "link", "add", "br0", "type", "bridge")  # no address: nothing lost
    sh("ip", "-n", pod.name, "link", "add", "veth1", "type", "veth", "peer", "veth2")
    sh("ip", "-n", pod.name, "link", "add", "mv0", "link", "veth1", "type", "macvlan")
    sh("ip", "-n", pod.name, "addr", "add", "198.18.2.2/24", "dev", "mv0")
    sh("ip", "-n", pod.name, "link", "add", "mv1", "link", "veth1", "type", "macvlan")  # no address
    sh("ip", "-n", pod.name, "tuntap", "add", "mode", "tap", "name", "tap7_kabuto")
    sh("ip", "-n", pod.name, "addr", "add", "198.18.3.2/24", "dev", "tap7_kabuto")
    found = {e.name: e for e in await network.scan(pod.path)}
    assert sorted(found) == ["eth0", "mv0"]
    assert found["mv0"].kind == "macvlan"
    assert found["mv0"].interface.addresses == [IPAddress("198.18.2.2", 24)]


@needs_netns
@pytest.mark.parametrize(("make", "kind"), [
    (("link", "add", "br0", "type", "bridge"), "bridge"),
    (("tuntap", "add", "mode", "tap", "name", "br0"), "tun"),  # a tap, but not one of Kabuto's
])
async def test_scan_refuses_an_addressed_interface_it_cannot_mirror(pod: Pod, make: tuple[str, ...],
                                                                   kind: str) -> None:
    sh("ip", "-n", pod.name, *make)
    sh("ip", "-n", pod.name, "addr", "add", "198.18.1.2/24", "dev", "br0")
    with pytest.raises(NetworkError, match=f"interface br0 \\({kind}\\) has an address but cannot be "
                                           "mirrored into the VM: only veth, macvlan, ipvlan"):
        await network.scan(pod.path)


@needs_netns
async def test_scan_names_a_path_that_is_no_netns(tmp_path: Path) -> None:
    missing = str(tmp_path / "cni-gone")
    with pytest.raises(NetnsGone, match=f"{missing} does not exist"):
        await network.scan(missing)
    plain = tmp_path / "plain"
    plain.write_text("")
    for wrong in (str(plain), "/proc/self/ns/mnt"):
        with pytest.raises(NetnsGone, match=f"{wrong} is not a network namespace"):
            await network.scan(wrong)
    assert not Path(missing).exists()  # pyroute2's default would have created it  # noqa: ASYNC240


def test_the_types_map_onto_the_agents_messages() -> None:
    interface = Interface("eth0", "02:42:0a:58:00:05", [IPAddress("10.88.0.5", 16)], 1500)
    message = containers_pb2.Interface(**dataclasses.asdict(interface))
    assert (message.name, message.mac, message.mtu) == ("eth0", "02:42:0a:58:00:05", 1500)
    assert [(a.address, a.prefix_length) for a in message.addresses] == [("10.88.0.5", 16)]
    route = containers_pb2.Route(**dataclasses.asdict(Route("default", "10.88.0.1", "eth0", "", 0)))
    assert (route.destination, route.gateway, route.device) == ("default", "10.88.0.1", "eth0")
    neighbour = ARPNeighbor("10.88.0.9", "eth0", "02:00:00:00:00:09")
    assert containers_pb2.ARPNeighbor(**dataclasses.asdict(neighbour)).mac == "02:00:00:00:00:09"


# -- attach / detach


@needs_netns
async def test_attach_redirects_both_ways_once(pod: Pod) -> None:
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint, "tcfilter")
    assert tap == "tap0_kabuto"
    link = links(pod.name)[tap]
    assert link["mtu"] == MTU and "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    assert link["linkinfo"]["info_data"]["user"] == "root"
    assert not link["linkinfo"]["info_data"]["multi_queue"]
    assert qdiscs(pod, "eth0").count("ingress") == 1 and qdiscs(pod, tap).count("ingress") == 1
    assert redirect_targets(pod, "eth0") == [tap]
    assert redirect_targets(pod, tap) == ["eth0"]
    assert await network.attach(pod.path, endpoint, "tcfilter") == tap
    assert redirect_targets(pod, "eth0") == [tap] and redirect_targets(pod, tap) == ["eth0"]
    assert [name for name in links(pod.name) if name.startswith("tap")] == [tap]


@needs_netns
async def test_a_half_attach_is_completed_not_doubled(pod: Pod) -> None:
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    sh("tc", "-n", pod.name, "qdisc", "del", "dev", "eth0", "ingress")  # the pod's half lost
    assert await network.attach(pod.path, endpoint) == tap
    assert redirect_targets(pod, "eth0") == [tap] and redirect_targets(pod, tap) == ["eth0"]


@needs_netns
async def test_a_multi_queue_tap_for_queues_above_one(pod: Pod) -> None:
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint, queues=4)
    assert links(pod.name)[tap]["linkinfo"]["info_data"]["multi_queue"]
    with pytest.raises(NetworkError, match=f"{tap} is attached already, with multi_queue True"):
        await network.attach(pod.path, endpoint)


def open_tap(netns_name: str, name: str) -> int:
    """The tap's fd as a VMM holds it (opened in the pod's netns, without packet information)."""
    def opened() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        return fd
    return in_netns(netns_name, opened)


def echo_through_tap(pod: str, tap: str, mac: str, address: str, sender_netns: str,
                     payload: bytes) -> tuple[bytes, str, Guest]:
    """A datagram sent from ``sender_netns`` to ``address`` crosses the redirect to ``tap``, where a
    stand-in guest (answering ARP as ``mac``) echoes it back; what came back, from whom, the guest."""
    fd = open_tap(pod, tap)
    guest = Guest(fd, mac, address)
    guest.start()
    sock = in_netns(sender_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.settimeout(5)
        sock.sendto(payload, (address, 4789))
        data, sender = sock.recvfrom(64)
    finally:
        guest.stop.set()
        guest.join(5)
        sock.close()
        os.close(fd)
    return data, sender[0], guest


class Guest(threading.Thread):
    """Stands for the VM behind the tap: answers ARP for the pod's address with the pod's MAC
    (the guest NIC's), and echoes UDP datagrams back to their sender, for 10 s at most."""

    def __init__(self, fd: int, mac: str, ip: str) -> None:
        super().__init__(daemon=True)
        self.fd, self.mac, self.ip = fd, bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip)
        self.deadline = time.monotonic() + 10
        self.arp_replies = self.echoes = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            frame = os.read(self.fd, 65536)
            reply = self.answer(frame)
            if reply:
                os.write(self.fd, reply)

    def answer(self, frame: bytes) -> bytes | None:
        dst, src, ethertype = frame[:6], frame[6:12], frame[12:14]
        is_request = frame[20:22] == b"\x00\x01"
        if ethertype == b"\x08\x06" and is_request and frame[38:42] == self.ip:
            self.arp_replies += 1
            sender_mac, sender_ip = frame[22:28], frame[28:32]
            arp = frame[14:20] + b"\x00\x02" + self.mac + frame[38:42] + sender_mac + sender_ip
            return src + self.mac + ethertype + arp
        if ethertype == b"\x08\x00" and frame[23] == socket.IPPROTO_UDP and dst == self.mac:
            self.echoes += 1
            ihl = (frame[14] & 0x0F) * 4
            ip, udp = frame[14:14 + ihl], frame[14 + ihl:]
            # swapping addresses and ports leaves both checksums as they were
            ip = ip[:12] + ip[16:20] + ip[12:16] + ip[20:]
            udp = udp[2:4] + udp[0:2] + udp[4:]
            return src + self.mac + ethertype + ip + udp
        return None


@needs_netns
async def test_frames_cross_the_redirect_both_ways(pod: Pod) -> None:
    """A datagram from the peer to the pod's address reaches the tap's reader (the VM), and its
    answer, written to the tap, reaches the peer; the filters' counters show both ways."""
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    data, sender, guest = echo_through_tap(pod.name, tap, pod.mac, POD_IP, pod.peer, b"kabuto")
    assert (data, sender) == (b"kabuto", POD_IP)
    assert guest.arp_replies >= 1 and guest.echoes == 1
    for dev in ("eth0", tap):
        [stats] = [a["stats"] for f in ingress_filters(pod, dev, stats=True) for a in f["options"]["actions"]]
        assert stats["packets"] >= 2, (dev, stats)


@needs_netns
async def test_detach_leaves_the_pod_as_cni_made_it(pod: Pod) -> None:
    before = pod_state(pod)
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    await network.detach(pod.path, tap)
    assert tap not in links(pod.name)
    assert pod_state(pod) == before
    await network.detach(pod.path, tap)  # again: nothing to do


@needs_netns
async def test_detach_keeps_an_ingress_qdisc_and_filters_of_others(pod: Pod) -> None:
    sh("tc", "-n", pod.name, "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress")
    sh("tc", "-n", pod.name, "filter", "add", "dev", "eth0", "parent", "ffff:", "prio", "1",
       "protocol", "0x88b5", "u32", "match", "u32", "0", "0", "flowid", "1:1")
    theirs = jq("tc", "-j", "-n", pod.name, "filter", "show", "dev", "eth0", "ingress")
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    assert redirect_targets(pod, "eth0") == [tap]
    await network.detach(pod.path, tap)
    assert qdiscs(pod, "eth0").count("ingress") == 1
    assert jq("tc", "-j", "-n", pod.name, "filter", "show", "dev", "eth0", "ingress") == theirs


@needs_netns
async def test_detach_all_of_a_netns_cni_deleted(pod: Pod, tmp_path: Path) -> None:
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    sh("ip", "netns", "del", pod.name)
    await network.detach_all(pod.path, [tap])
    await network.detach_all(str(tmp_path / "never-was"), ["tap0_kabuto", "tap1_kabuto"])


@needs_netns
async def test_detach_touches_only_kabuto_taps(pod: Pod) -> None:
    with pytest.raises(NetworkError, match="'eth0' is not a tap Kabuto made"):
        await network.detach(pod.path, "eth0")
    sh("ip", "-n", pod.name, "link", "add", "tap3_kabuto", "type", "bridge")
    with pytest.raises(NetworkError, match="tap3_kabuto is a bridge interface, not a tap Kabuto made"):
        await network.detach(pod.path, "tap3_kabuto")
    assert "tap3_kabuto" in links(pod.name) and "eth0" in links(pod.name)


@needs_netns
async def test_a_failed_attach_leaves_nothing(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod's half fails after the tap and its half exist: both go again."""
    before = pod_state(pod)
    [endpoint] = await network.scan(pod.path)
    real = tcfilter._redirect

    def failing(ipr, source, target):  # type: ignore[no-untyped-def]
        undo = real(ipr, source, target)
        if links(pod.name)["eth0"]["ifindex"] == source:
            for step in reversed(undo):
                step()  # as the kernel refusing the filter would leave it
            raise tcfilter.NetlinkError(95, "Operation not supported")
        return undo

    monkeypatch.setattr(tcfilter, "_redirect", failing)
    with pytest.raises(NetworkError, match="connecting eth0 to a tap: Operation not supported"):
        await network.attach(pod.path, endpoint)
    assert [name for name in links(pod.name) if name.startswith("tap")] == []
    assert pod_state(pod) == before


@needs_netns
@pytest.mark.parametrize(("model", "message"), [
    ("macvtap", "internetworking_model 'macvtap' is not supported: use 'tcfilter' or 'none'"),
    ("l3forwarding", "internetworking_model 'l3forwarding' is not supported"),
    ("bridged", "unknown internetworking_model 'bridged'"),
])
async def test_other_models_are_refused_by_name(pod: Pod, model: str, message: str) -> None:
    [endpoint] = await network.scan(pod.path)
    with pytest.raises(NetworkError, match=message):
        await network.attach(pod.path, endpoint, model)


@needs_netns
async def test_model_none_gives_no_tap(pod: Pod) -> None:
    before = pod_state(pod)
    [endpoint] = await network.scan(pod.path)
    assert await network.attach(pod.path, endpoint, "none") is None
    assert sorted(links(pod.name)) == ["eth0", "lo"] and pod_state(pod) == before


@needs_netns
async def test_bad_endpoints_are_refused(pod: Pod) -> None:
    [endpoint] = await network.scan(pod.path)
    no_mac = dataclasses.replace(endpoint, interface=dataclasses.replace(endpoint.interface, mac=""))
    with pytest.raises(NetworkError, match="interface eth0 has no MAC address"):
        await network.attach(pod.path, no_mac)
    long = dataclasses.replace(endpoint, interface=dataclasses.replace(endpoint.interface, name="x" * 16))
    with pytest.raises(NetworkError, match="'xxxxxxxxxxxxxxxx' is not 1 to 15 characters long"):
        await network.attach(pod.path, long)
    other_mac = dataclasses.replace(endpoint.interface, mac="02:00:00:00:00:01")
    other = dataclasses.replace(endpoint, interface=other_mac)
    with pytest.raises(NetworkError, match=f"eth0 has MAC {pod.mac}, not 02:00:00:00:00:01"):
        await network.attach(pod.path, other)
    missing = dataclasses.replace(endpoint, interface=dataclasses.replace(endpoint.interface, name="eth9"))
    with pytest.raises(NetworkError, match="no interface eth9"):
        await network.attach(pod.path, missing)
    assert sorted(links(pod.name)) == ["eth0", "lo"]


def test_tap_names_fit_ifnamsiz() -> None:
    assert network.tcfilter.tap_name(99999) == "tap99999_kabuto"
    with pytest.raises(NetworkError, match="tap100000_kabuto is longer than 15 characters"):
        network.tcfilter.tap_name(100000)


def test_vhost_net_is_checked_not_assumed(tmp_path: Path) -> None:
    assert not vhost_net_available(tmp_path / "vhost-net")
    (tmp_path / "plain").write_text("")
    assert not vhost_net_available(tmp_path / "plain")
    assert vhost_net_available(Path("/dev/null"))  # a character device open to root
    real = Path("/dev/vhost-net")
    assert vhost_net_available() == (real.is_char_device() and os.access(real, os.R_OK | os.W_OK))


def test_host_facts_name_what_is_missing(tmp_path: Path) -> None:
    facts = network.host_facts(tun=tmp_path / "no-tun", vhost=tmp_path / "no-vhost")
    assert facts == [f"tap devices: {tmp_path / 'no-tun'} missing: a pod's interfaces cannot reach the VM",
                     f"vhost-net: {tmp_path / 'no-vhost'} missing: QEMU moves packets itself (slower)"]
