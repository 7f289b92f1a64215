"""The guest's networking for real, without a VM: the agent runs on this host in network,
mount and UTS namespaces of its own (test_guest_containers' agent), lo comes up with it, and
the test makes the "NICs" there (veth links with a given MAC) through nsenter, then checks
what UpdateInterface, UpdateRoutes and AddARPNeighbors did with ``ip -j``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_guest_containers as guest

from kabuto.agent.containers import (
    ARPNeighbor,
    ContainerCallError,
    ContainerClient,
    Interface,
    IPAddress,
    Route,
)
from kabuto.ttrpc import Code

NSENTER = shutil.which("nsenter")
IP = shutil.which("ip")

pytestmark = [
    *guest.pytestmark,
    pytest.mark.skipif(NSENTER is None or IP is None, reason="needs nsenter and iproute2's ip"),
]
# the agent of test_guest_containers, one per module
agent_process = guest.agent_process
client = guest.client
rootfs = guest.rootfs
run = guest.run
sh = guest.sh


def in_agent_netns(agent_pid: int, *args: str) -> str:
    command = [NSENTER or "nsenter", f"--net=/proc/{agent_pid}/ns/net", IP or "ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout


def ip_json(agent_pid: int, *args: str) -> Any:
    return json.loads(in_agent_netns(agent_pid, "-j", *args) or "[]")


async def test_lo_is_up_from_the_start_and_a_container_reaches_127_0_0_1(
    client: ContainerClient, rootfs: Path, agent_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    (lo,) = ip_json(agent_process[0].pid, "link", "show", "lo")
    assert "UP" in lo["flags"]
    # busybox httpd serves the rootfs's /etc to wget, over 127.0.0.1 only
    fetch = "for i in $(seq 50); do wget -q -O - http://127.0.0.1:4242/group && break; sleep 0.1; done"
    status, out, err = await run(client, sh(rootfs, f"httpd -f -p 127.0.0.1:4242 -h /etc & {fetch}; kill $!"))
    assert (status, out) == (0, (rootfs / "etc/group").read_bytes()), err


@pytest.fixture
def nics(agent_process: tuple[subprocess.Popen[bytes], str]) -> Iterator[Callable[[str, str], None]]:
    """Make "NICs" with a given name and MAC in the agent's netns (veth pairs, their peers named
    <name>p: this host's kernel may lack dummy links); all gone after the test."""
    pid = agent_process[0].pid
    made: list[str] = []

    def make(name: str, mac: str) -> None:
        in_agent_netns(pid, "link", "add", name, "address", mac, "type", "veth", "peer", "name", f"{name}p")
        made.append(mac)

    yield make
    for link in ip_json(pid, "link", "show"):
        if link.get("address") in made:
            in_agent_netns(pid, "link", "delete", link["ifname"])


def addresses_of(pid: int, name: str) -> list[str]:
    (link,) = ip_json(pid, "addr", "show", "dev", name)
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"])


async def test_update_interface_renames_addresses_and_sets_up_the_nic_with_that_mac(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
) -> None:
    pid = agent_process[0].pid
    nics("nic0", "02:42:0a:58:00:05")
    in_agent_netns(pid, "addr", "add", "192.0.2.9/24", "dev", "nic0")  # replaced below
    wanted = Interface(
        name="eth0",
        mac="02:42:0A:58:00:05",  # matched whatever its case
        addresses=(IPAddress("10.88.0.5", 16), IPAddress("fd00::5", 64)),
        mtu=1450,
    )
    got = await client.update_interface(wanted)
    (link,) = ip_json(pid, "link", "show", "eth0")
    assert link["address"] == "02:42:0a:58:00:05" and link["mtu"] == 1450 and "UP" in link["flags"]
    on_link = [a for a in addresses_of(pid, "eth0") if not a.startswith("fe80:")]
    assert on_link == ["10.88.0.5/16", "fd00::5/64"]
    assert (got.name, got.mac, got.mtu) == ("eth0", "02:42:0a:58:00:05", 1450)
    assert {"10.88.0.5/16", "fd00::5/64"} <= {f"{a.address}/{a.prefix_length}" for a in got.addresses}
    # again, with other addresses and the MTU left alone: the same NIC, found by its MAC
    got = await client.update_interface(Interface("eth0", wanted.mac, (IPAddress("10.88.0.6", 16),)))
    assert [a for a in addresses_of(pid, "eth0") if not a.startswith("fe80:")] == ["10.88.0.6/16"]
    assert got.mtu == 1450


async def test_update_interface_waits_a_little_for_a_hot_plugged_nic(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
) -> None:
    async def plug_later() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(nics, "late0", "02:00:00:00:00:42")

    plugging = asyncio.create_task(plug_later())
    got = await client.update_interface(Interface("eth1", "02:00:00:00:00:42", (IPAddress("10.1.0.2", 24),)))
    await plugging
    assert got.name == "eth1"
    assert "10.1.0.2/24" in addresses_of(agent_process[0].pid, "eth1")


@pytest.mark.parametrize(
    ("interface", "code", "words"),
    [
        (Interface("eth0", "02:00:00:00:00:99"), Code.NOT_FOUND, "no guest interface has MAC"),
        (Interface("a-name-far-too-long", "02:00:00:00:00:01"), Code.INVALID_ARGUMENT, "interface name"),
        (Interface("a/b", "02:00:00:00:00:01"), Code.INVALID_ARGUMENT, "interface name"),
        (Interface("lo", "02:00:00:00:00:01"), Code.INVALID_ARGUMENT, "lo is the guest's own"),
        (Interface("eth0", "00:00:00:00:00:00"), Code.INVALID_ARGUMENT, "lo is the guest's own"),
        (Interface("eth0", "02:00:00:00:01"), Code.INVALID_ARGUMENT, "not a MAC address"),
        (Interface("eth0", "02:00:00:00:00:01", (IPAddress("10.0.0.300", 8),)), Code.INVALID_ARGUMENT,
         "not an IP address"),
        (Interface("eth0", "02:00:00:00:00:01", (IPAddress("10.0.0.3", 33),)), Code.INVALID_ARGUMENT,
         "prefix length 33"),
        (Interface("eth0", "02:00:00:00:00:01", (IPAddress("fd00::3", 0),)), Code.INVALID_ARGUMENT,
         "prefix length 0"),
        (Interface("eth0", "02:00:00:00:00:01", mtu=70000), Code.INVALID_ARGUMENT, "MTU 70000"),
        (Interface("eth0", "02:00:00:00:00:01", tuple(IPAddress(f"10.0.0.{i}", 8) for i in range(65))),
         Code.INVALID_ARGUMENT, "at most 64 addresses"),
    ],
)  # fmt: skip
async def test_bad_interfaces_are_refused_and_change_nothing(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
    interface: Interface,
    code: Code,
    words: str,
) -> None:
    nics("nic9", "02:00:00:00:00:01")
    before = ip_json(agent_process[0].pid, "addr", "show")
    client.agent.call_timeout = 5.0  # NOT_FOUND comes after the wait for a hot-plugged NIC, bounded by this
    with pytest.raises(ContainerCallError) as caught:
        await client.update_interface(interface)
    assert caught.value.code == code and words in caught.value.message, caught.value.message
    assert ip_json(agent_process[0].pid, "addr", "show") == before


async def test_a_container_sees_the_interfaces_the_agent_configured(
    client: ContainerClient,
    rootfs: Path,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
) -> None:
    nics("nic1", "02:00:00:00:00:11")
    await client.update_interface(Interface("eth0", "02:00:00:00:00:11", (IPAddress("10.88.0.7", 16),)))
    spec = sh(rootfs, "ip -o -4 addr show dev eth0; cat /sys/class/net/eth0/address")
    spec["linux"]["namespaces"].append({"type": "network", "path": "/var/run/netns/cni-1"})
    status, out, err = await run(client, spec)
    assert status == 0, err
    assert "inet 10.88.0.7/16" in out.decode() and "02:00:00:00:00:11" in out.decode()


def routes_of(pid: int, *family: str) -> list[dict[str, Any]]:
    return [
        {key: route[key] for key in ("dst", "gateway", "dev", "prefsrc", "scope", "protocol") if key in route}
        for route in ip_json(pid, *family, "route", "show", "table", "main")
    ]


async def test_update_routes_replaces_a_devices_routes_link_routes_first_ipv4_and_ipv6(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
) -> None:
    pid = agent_process[0].pid
    nics("nic2", "02:00:00:00:00:22")
    await client.update_interface(
        Interface("eth0", "02:00:00:00:00:22", (IPAddress("10.88.0.5", 24), IPAddress("fd00::5", 64)))
    )
    in_agent_netns(pid, "route", "add", "198.51.100.0/24", "dev", "eth0")  # an old one: it goes
    routes = [
        # the gateway first: the guest adds the link route that reaches it before
        Route("default", gateway="172.16.0.1", device="eth0"),
        Route("172.16.0.1/32", device="eth0", scope=253),
        Route("10.99.0.0/16", device="eth0", source="10.88.0.5", scope=253),
        Route("", gateway="fd00::1", device="eth0"),
    ]
    got = await client.update_routes(routes)
    v4 = routes_of(pid, "-4")
    assert {"dst": "default", "gateway": "172.16.0.1", "dev": "eth0", "protocol": "static"} in v4
    assert {"dst": "172.16.0.1", "dev": "eth0", "scope": "link", "protocol": "static"} in v4
    assert {"dst": "10.99.0.0/16", "dev": "eth0", "prefsrc": "10.88.0.5", "scope": "link",
            "protocol": "static"} in v4  # fmt: skip
    assert not [r for r in v4 if r["dst"] == "198.51.100.0/24"]
    # the kernel's route for the address stays
    assert [r for r in v4 if r["dst"] == "10.88.0.0/24" and r["protocol"] == "kernel"]
    v6 = routes_of(pid, "-6")
    assert [r for r in v6 if r["dst"] == "default" and r.get("gateway") == "fd00::1"]
    assert Route("default", "172.16.0.1", "eth0") in got
    assert Route("172.16.0.1/32", "", "eth0", "", 253) in got
    assert Route("default", "fd00::1", "eth0") in got
    # again, fewer: the device's static routes become these
    got = await client.update_routes([Route("10.77.0.0/16", device="eth0")])
    statics = [r for r in routes_of(pid, "-4") + routes_of(pid, "-6") if r["protocol"] == "static"]
    assert statics == [{"dst": "10.77.0.0/16", "dev": "eth0", "protocol": "static"}]


@pytest.mark.parametrize(
    ("route", "code", "words"),
    [
        (Route("10.0.0.0/8"), Code.INVALID_ARGUMENT, "no device"),
        (Route("10.0.0.0/8", device="lo"), Code.INVALID_ARGUMENT, "lo's routes"),
        (Route("10.0.0.0/8", device="nope0"), Code.NOT_FOUND, "no interface 'nope0'"),
        (Route("10.0.0.1/8", device="nic3"), Code.INVALID_ARGUMENT, "is not a network"),
        (Route("10.0.0.0/8", gateway="fd00::1", device="nic3"), Code.INVALID_ARGUMENT, "mixed"),
        (Route("default", device="nic3"), Code.INVALID_ARGUMENT, "needs a gateway"),
        (Route("10.0.0.0/8", device="nic3", scope=255), Code.INVALID_ARGUMENT, "scope 255"),
        # no link route reaches the gateway
        (Route("default", gateway="203.0.113.1", device="nic3"), Code.FAILED_PRECONDITION, "203.0.113.1"),
    ],
)
async def test_bad_routes_are_refused(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
    route: Route,
    code: Code,
    words: str,
) -> None:
    nics("nic3", "02:00:00:00:00:33")
    in_agent_netns(agent_process[0].pid, "link", "set", "nic3", "up")
    with pytest.raises(ContainerCallError) as caught:
        await client.update_routes([route])
    assert caught.value.code == code and words in caught.value.message, caught.value.message
    with pytest.raises(ContainerCallError, match="at most 256 routes"):
        await client.update_routes([Route("10.0.0.0/8", device="nic3")] * 257)


async def test_add_arp_neighbors_makes_permanent_entries(
    client: ContainerClient,
    agent_process: tuple[subprocess.Popen[bytes], str],
    nics: Callable[[str, str], None],
) -> None:
    pid = agent_process[0].pid
    nics("nic4", "02:00:00:00:00:44")
    await client.update_interface(Interface("eth0", "02:00:00:00:00:44", (IPAddress("10.88.0.5", 24),)))
    await client.add_arp_neighbors(
        [
            ARPNeighbor("10.88.0.1", "eth0", "02:AA:BB:CC:DD:01"),
            ARPNeighbor("fd00::1", "eth0", "02:aa:bb:cc:dd:02"),
        ]
    )
    found = {(n["dst"], n["lladdr"], tuple(n["state"])) for n in ip_json(pid, "neigh", "show", "dev", "eth0")}
    assert ("10.88.0.1", "02:aa:bb:cc:dd:01", ("PERMANENT",)) in found
    assert ("fd00::1", "02:aa:bb:cc:dd:02", ("PERMANENT",)) in found
    for neighbor, words in [
        (ARPNeighbor("10.88.0.300", "eth0", "02:aa:bb:cc:dd:01"), "not an IP address"),
        (ARPNeighbor("10.88.0.2", "eth0", "02:aa:bb:cc:dd"), "not a MAC address"),
        (ARPNeighbor("10.88.0.2", "nope0", "02:aa:bb:cc:dd:03"), "no interface"),
    ]:
        with pytest.raises(ContainerCallError, match=words):
            await client.add_arp_neighbors([neighbor])
