"""Pod networking as a CRI sets it up, in a real VM: Debian's CNI plugins (loopback, then bridge
with host-local IPAM, run with CNI_COMMAND=ADD and the config on stdin, as containerd's CRI runs
them) make the pod's netns; the bundle names that netns, as CRI's spec does; the container sees
CNI's address on eth0, the default route, lo up, and reaches the gateway on the bridge. The same
steps under runc, in the same harness, are the baseline. The bridge lives in a netns standing for
the host, so the machine's own network is never touched; everything is removed afterwards."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cni_helpers import CniPod, bridge_config, host_netns_fixture, ingress_leftovers, links, netns_left, sh
from test_runtime_helpers import busybox_rootfs, kabuto, require_guest_image, state_root_fixture, write_bundle

from kabuto.config.loader import builtin_default_text

pytestmark = pytest.mark.vm

SUBNET, GATEWAY = "198.18.7.0/24", "198.18.7.1"
SCRIPT = (f"ip -o -4 addr show eth0 | awk '{{print $4}}'; ip route | grep ^default; "
          f"ping -c 1 -W 10 {GATEWAY} >/dev/null && echo gateway-reached; "
          "ping -c 1 -W 5 127.0.0.1 >/dev/null && echo lo-up")
TIMEOUT = 60.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


@pytest.fixture
def host_netns() -> Iterator[str]:
    yield from host_netns_fixture()


def pod_bundle(directory: Path, rootfs: Path, netns: str) -> Path:
    def join(spec: dict[str, Any]) -> None:
        for namespace in spec["linux"]["namespaces"]:
            if namespace["type"] == "network":
                namespace["path"] = netns
        # ping's raw socket, as Docker's default capabilities allow it
        for kind in spec["process"]["capabilities"].values():
            kind.append("CAP_NET_RAW")
    return write_bundle(directory, rootfs, ["sh", "-c", SCRIPT], change=join)


def run_runc(bundle: Path, root: Path) -> str:
    result = subprocess.run(["runc", "--root", str(root), "run", "--bundle", str(bundle), "netbase"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    subprocess.run(["runc", "--root", str(root), "delete", "--force", "netbase"], capture_output=True)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def test_cni_pod_network_as_under_runc(state_root: Path, host_netns: str, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    outputs = {}
    for runtime in ("runc", "kabuto"):
        pod = CniPod(host_netns, bridge_config(SUBNET, tmp_path / f"ipam-{runtime}"))
        try:
            address = pod.result["ips"][0]["address"]
            bundle = pod_bundle(tmp_path / runtime, rootfs, pod.path)
            if runtime == "runc":
                outputs[runtime] = (address, run_runc(bundle, tmp_path / "runc-root"))
                continue
            result = kabuto(state_root, "run", "--bundle", str(bundle), "net1", timeout=300)
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            outputs[runtime] = (address, result.stdout.decode())
            # the tap and its tc redirects went with the sandbox; CNI's veth is as CNI left it
            assert links(pod.name) == ["eth0", "lo"] and ingress_leftovers(pod.name) == []
        finally:
            pod.close()
        assert netns_left([pod.name]) == []
    # the same lines under both, but for the address each pod was given
    (runc_address, runc_out), (kabuto_address, kabuto_out) = outputs["runc"], outputs["kabuto"]
    runc_lines = runc_out.splitlines()
    assert runc_lines[0] == runc_address and runc_lines[2:] == ["gateway-reached", "lo-up"], runc_out
    assert kabuto_out.replace(kabuto_address, "ADDR") == runc_out.replace(runc_address, "ADDR")


def test_run_net_and_the_api_take_a_netns_path(state_root: Path, host_netns: str, tmp_path: Path) -> None:
    """`kabuto run --busybox --net PATH` and `Sandbox(netns=PATH)` (with network_queues = 2): the
    same pod network without a bundle of one's own."""
    import kabuto as api

    require_guest_image()
    pod = CniPod(host_netns, bridge_config(SUBNET, tmp_path / "ipam"))
    try:
        address = pod.result["ips"][0]["address"]
        result = kabuto(state_root, "run", "--busybox", "--net", pod.path, "--", "sh", "-c",
                        "ip -o -4 addr show eth0 | awk '{print $4}'", timeout=300)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout.decode().split() == [address]
        assert links(pod.name) == ["eth0", "lo"] and ingress_leftovers(pod.name) == []
        # with two queue pairs per NIC: the tap is multi-queue and QEMU opened it twice; the guest's
        # virtio-net device offers VIRTIO_NET_F_MQ (feature bit 22)
        config = tmp_path / "configuration.toml"
        config.write_text(builtin_default_text())
        (tmp_path / "config.d").mkdir()
        (tmp_path / "config.d" / "50-queues.toml").write_text("[hypervisor.qemu]\nnetwork_queues = 2\n")
        with api.Sandbox(config=str(config), state_root=state_root, netns=pod.path) as sandbox:
            shown = sandbox.run(["sh", "-c", "ip -o -4 addr show eth0 | awk '{print $4}'; "
                                 "cut -c23 /sys/class/net/eth0/device/features"])
            [tap] = json.loads(sh("ip", "-d", "-j", "-n", pod.name, "link", "show", "tap0_kabuto"))
        assert shown.exit_code == 0, shown.stderr
        assert shown.stdout.decode().split() == [address, "1"]
        tun = tap["linkinfo"]["info_data"]
        # QEMU detaches the queues a 1-vCPU guest leaves unused: attached + detached is what it opened
        held = tun.get("numqueues", 0) + tun.get("numdisabled", 0)
        assert (tun["type"], tun.get("multi_queue"), held) == ("tap", True, 2), tun
        assert links(pod.name) == ["eth0", "lo"] and ingress_leftovers(pod.name) == []
    finally:
        pod.close()
    assert netns_left([pod.name]) == []
