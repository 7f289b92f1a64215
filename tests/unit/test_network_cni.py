"""runtime/network against what Debian's containernetworking-plugins make: the bridge plugin with
host-local IPAM, run as a CRI runs it (CNI_COMMAND=ADD/DEL, the config on stdin), from a netns
standing for the host so the machine's own netns gets no bridge."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_helpers import needs_netns, netns, path, sh
from test_network import echo_through_tap, links

from kabuto.runtime import network
from kabuto.runtime.network import IPAddress, Route

CNI_PATH = Path("/usr/lib/cni")
SUBNET, GATEWAY = "198.18.4.0/24", "198.18.4.1"

needs_cni = pytest.mark.skipif(not (CNI_PATH / "bridge").exists() or not (CNI_PATH / "host-local").exists(),
                               reason="needs containernetworking-plugins (bridge, host-local)")


@dataclass
class CniPod:
    name: str  # the pod's netns
    host: str  # the netns the plugin ran in (holds the bridge, the gateway address)
    result: dict

    @property
    def path(self) -> str:
        return path(self.name)


def cni(command: str, host: str, pod: str, config: dict) -> str:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"kabuto-{pod}", "CNI_NETNS": path(pod),
           "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_PATH), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return sh("ip", "netns", "exec", host, str(CNI_PATH / "bridge"), stdin=json.dumps(config), env=env)


@pytest.fixture
def cni_pod(tmp_path: Path) -> Iterator[CniPod]:
    config = {
        "cniVersion": "1.0.0", "name": "kabuto-test", "type": "bridge", "bridge": "kbt-br0",
        "isGateway": True, "isDefaultGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                 "dataDir": str(tmp_path / "ipam")},
    }
    with netns() as name, netns() as host:
        result = json.loads(cni("ADD", host, name, config))
        try:
            yield CniPod(name, host, result)
        finally:
            cni("DEL", host, name, config)
        leases = [p.name for p in (tmp_path / "ipam" / "kabuto-test").iterdir()]
        assert not [lease for lease in leases if lease.startswith("198.")], leases  # DEL released it


@needs_netns
@needs_cni
async def test_scan_finds_what_the_bridge_plugin_configured(cni_pod: CniPod) -> None:
    [eth0] = [i for i in cni_pod.result["interfaces"] if i["name"] == "eth0"]
    [ip] = cni_pod.result["ips"]
    address, prefix = ip["address"].split("/")
    [endpoint] = await network.scan(cni_pod.path)
    assert endpoint.kind == "veth" and endpoint.name == "eth0"
    assert endpoint.interface.mac == eth0["mac"]
    assert endpoint.interface.addresses == [IPAddress(address, int(prefix))]
    assert Route("default", GATEWAY, "eth0", "", 0) in endpoint.routes
    assert endpoint.routes[0] == Route(SUBNET, "", "eth0", address, 253)  # the link route first


@needs_netns
@needs_cni
async def test_a_tap_behind_cnis_veth_carries_traffic_and_goes_again(cni_pod: CniPod) -> None:
    """From the host side of CNI's bridge, a datagram to the pod's address reaches the tap's
    reader and its answer comes back; after detach, CNI's DEL (in the fixture) still succeeds."""
    [endpoint] = await network.scan(cni_pod.path)
    address = endpoint.interface.addresses[0].address
    tap = await network.attach(cni_pod.path, endpoint)
    assert tap is not None
    data, sender, guest = echo_through_tap(cni_pod.name, tap, endpoint.interface.mac, address, cni_pod.host,
                                           b"through cni")
    assert (data, sender) == (b"through cni", address) and guest.echoes == 1
    await network.detach(cni_pod.path, tap)
    assert sorted(links(cni_pod.name)) == ["eth0", "lo"]
