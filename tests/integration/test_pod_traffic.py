"""Real traffic through a pod network, under runc and kabuto in one harness (real QEMU VMs).

Debian's CNI plugins make the pod's netns as containerd's CRI would (loopback, then bridge +
host-local as eth0, with an MTU), from a netns standing for the host; a second netns on the same
bridge holds a server, as another pod would. Then, with the same bundles under both runtimes:

* the pod's sandbox container runs busybox httpd, and a client in the host netns fetches a page;
* CNI adds a second network (eth1) to the running pod, and the next container of the pod sees it
  (kabuto: rescanned at that container's create, a NIC hot-plugged and configured; kabuto's NICs
  have network_queues = 2, so both taps are multi-queue and opened twice);
* that second container reads the MTU CNI set, reaches the first over 127.0.0.1, reaches the
  second network's gateway, and fetches 64 MiB from the server across the bridge: its checksum
  is the file's;
* CNI removes eth1 again, and the pod's next container sees only eth0 and lo (kabuto: the NIC
  hot-unplugged and its tap removed at that create).

One sandbox VM serves every check; at the end the pod's process is SIGKILLed (kabuto: the VMM)
before `delete --force`. Afterwards nothing of kabuto's remains: no tap, ingress qdisc or
tc filter in the pod netns, no netns of the test's, no VMM process, nothing under the state root.
Addresses are only those CNI gives inside the test's own namespaces."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cni_helpers import (
    CniPod,
    bridge_config,
    host_netns_fixture,
    ingress_leftovers,
    links,
    netns_left,
    sh,
)
from test_runtime_helpers import busybox_rootfs, kabuto, require_guest_image, state_root_fixture, write_bundle

from kabuto.config.loader import builtin_default_text
from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = pytest.mark.vm

POD_SUBNET, SECOND_SUBNET, SECOND_GATEWAY = "198.18.8.0/24", "198.18.9.0/24", "198.18.9.1"
MTU = 1400
POD_PORT, SERVER_PORT = 8000, 8080
PAGE = "served from the pod\n"
BIG = 64 * 1024 * 1024
TIMEOUT = 300.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


@pytest.fixture
def host_netns() -> Iterator[str]:
    yield from host_netns_fixture()


def bundle(directory: Path, rootfs: Path, netns: str, args: list[str], annotations: dict[str, str]) -> Path:
    def join(spec: dict[str, Any]) -> None:
        for namespace in spec["linux"]["namespaces"]:
            if namespace["type"] == "network":
                namespace["path"] = netns
        for kind in spec["process"]["capabilities"].values():
            kind.append("CAP_NET_RAW")  # ping's raw socket, as Docker's default capabilities allow
    return write_bundle(directory, rootfs, args, change=join, annotations=annotations)


# busybox 1.35's wget crashes with -T: the container bounds it with timeout(1) instead
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")


def fetch_from(netns: str, url: str, timeout: float = 120.0) -> str:
    """``url`` fetched by a client in ``netns``, retried until the server listens (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", FETCH, url],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return done.stdout
        assert time.monotonic() < deadline, f"{url} from {netns}: {done.stderr}"
        time.sleep(0.5)


def tap_queues(netns: str) -> dict[str, int]:
    """Kabuto's multi-queue taps in ``netns`` -> the queues opened on each (attached + detached:
    QEMU detaches those a 1-vCPU guest leaves unused)."""
    found = {}
    for link in json.loads(sh("ip", "-d", "-j", "-n", netns, "link", "show")):
        data = link.get("linkinfo", {}).get("info_data", {})
        if link["ifname"].endswith("_kabuto") and data.get("multi_queue"):
            found[link["ifname"]] = data.get("numqueues", 0) + data.get("numdisabled", 0)
    return found


class Runtime:
    """The same OCI steps under runc or kabuto: a detached sandbox container, a pod member run in
    the foreground, a forced delete."""

    def __init__(self, name: str, state_root: Path, runc_root: Path, config: Path) -> None:
        self.name, self.state_root, self.runc_root, self.config = name, state_root, runc_root, config

    def start(self, bundle_dir: Path, container_id: str) -> None:
        if self.name == "runc":
            # a file, not a pipe: the detached container keeps runc's stdio
            with tempfile.TemporaryFile() as stderr:
                done = subprocess.run(["runc", "--root", str(self.runc_root), "run", "-d", "--bundle",
                                       str(bundle_dir), container_id], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=stderr, timeout=TIMEOUT)
                stderr.seek(0)
                assert done.returncode == 0, stderr.read()
            return
        kabuto(self.state_root, "--config", str(self.config), "create", "--bundle", str(bundle_dir),
               container_id, check=True)
        kabuto(self.state_root, "start", container_id, check=True)

    def run(self, bundle_dir: Path, container_id: str) -> str:
        if self.name == "runc":
            done = subprocess.run(["runc", "--root", str(self.runc_root), "run", "--bundle", str(bundle_dir),
                                   container_id], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=TIMEOUT)
            assert done.returncode == 0, (done.stdout, done.stderr)
            return done.stdout
        result = kabuto(self.state_root, "run", "--bundle", str(bundle_dir), container_id, check=True)
        return result.stdout.decode()

    def kill_holder(self, container_id: str) -> None:
        """SIGKILL what holds the pod (runc: the container's init, as `state` names it; kabuto: the
        VMM, found by its command line) and wait until it is gone: what a crash leaves for
        ``delete --force`` to clean up."""
        if self.name == "runc":
            shown = subprocess.run(["runc", "--root", str(self.runc_root), "state", container_id],
                                   capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
            process = psutil.Process(json.loads(shown)["pid"])
        else:
            process, = [p for p in psutil.process_iter(["name", "cmdline"])
                        if "qemu" in (p.info["name"] or "")
                        and any(str(self.state_root) in arg for arg in p.info["cmdline"] or [])]
        process.kill()
        process.wait(timeout=30)

    def delete(self, container_id: str) -> None:
        if self.name == "runc":
            subprocess.run(["runc", "--root", str(self.runc_root), "delete", "--force", container_id],
                           capture_output=True, timeout=TIMEOUT)
        else:
            kabuto(self.state_root, "delete", "--force", container_id, check=True)


def test_pod_traffic_as_under_runc(state_root: Path, host_netns: str, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "www").mkdir()
    (rootfs / "www" / "index.html").write_text(PAGE)
    served = tmp_path / "served"
    served.mkdir()
    big = served / "big"
    with big.open("wb") as out:
        for _ in range(BIG // (1 << 20)):
            out.write(os.urandom(1 << 20))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    # kabuto's NICs get two queue pairs: the cold-plugged and the hot-plugged one alike
    config = tmp_path / "configuration.toml"
    config.write_text(builtin_default_text())
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-queues.toml").write_text("[hypervisor.qemu]\nnetwork_queues = 2\n")
    ipam = tmp_path / "ipam"  # one lease store: the server and the pods share the bridge's subnet
    made: list[str] = []
    server = CniPod(host_netns, bridge_config(POD_SUBNET, ipam, mtu=MTU))
    made.append(server.name)
    httpd = subprocess.Popen(["ip", "netns", "exec", server.name, "busybox", "httpd", "-f", "-p",
                              str(SERVER_PORT), "-h", str(served)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outputs: dict[str, tuple[str, str]] = {}
    try:
        server_url = f"http://{server.address()}:{SERVER_PORT}/big"
        for name in ("runc", "kabuto"):
            runtime = Runtime(name, state_root, tmp_path / "runc-root", config)
            pod = CniPod(host_netns, bridge_config(POD_SUBNET, ipam, mtu=MTU))
            made.append(pod.name)
            sandbox_id, member_id = f"{name}-pod", f"{name}-member"
            try:
                first = bundle(tmp_path / name / "sandbox", rootfs, pod.path,
                               ["httpd", "-f", "-p", str(POD_PORT), "-h", "/www"],
                               {CONTAINER_TYPE_ANNOTATION: "sandbox", SANDBOX_ID_ANNOTATION: sandbox_id})
                runtime.start(first, sandbox_id)
                try:
                    page = fetch_from(host_netns, f"http://{pod.address()}:{POD_PORT}/index.html")
                    # an interface CNI adds to the running pod (no default route: eth0 has it)
                    second = pod.add(bridge_config(SECOND_SUBNET, tmp_path / f"ipam2-{name}",
                                                   bridge="kbt-br1", default_route=False), "eth1")
                    script = (
                        "cat /sys/class/net/eth0/mtu; "
                        f"timeout 30 wget -q -O - http://127.0.0.1:{POD_PORT}/index.html; "
                        "ip -o -4 addr show eth1 | awk '{print $4}'; "
                        f"ping -c 1 -W 10 {SECOND_GATEWAY} >/dev/null && echo second-gateway-reached; "
                        f"timeout 120 wget -q -O - {server_url} | sha256sum | cut -d' ' -f1")
                    joins = {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: sandbox_id}
                    member = bundle(tmp_path / name / "member", rootfs, pod.path, ["sh", "-c", script], joins)
                    started = time.monotonic()
                    output = runtime.run(member, member_id)
                    print(f"{name}: the member container's run took {time.monotonic() - started:.1f}s")
                    if name == "kabuto":  # both taps multi-queue, each opened twice by QEMU
                        assert tap_queues(pod.name) == {"tap0_kabuto": 2, "tap1_kabuto": 2}
                    # CNI removes that network again: the next container no longer sees it (kabuto:
                    # its NIC hot-unplugged and its tap removed at that create)
                    pod.remove("eth1")
                    started = time.monotonic()
                    # (the interfaces CNI made; lo is the kernel's own)
                    after = runtime.run(bundle(tmp_path / name / "late", rootfs, pod.path,
                                               ["sh", "-c", "ls /sys/class/net | grep ^eth"], joins),
                                        f"{name}-late")
                    print(f"{name}: the container after eth1 went took {time.monotonic() - started:.1f}s")
                    if name == "kabuto":  # eth1's tap went with its NIC; eth0's stays while the pod runs
                        assert links(pod.name) == ["eth0", "lo", "tap0_kabuto"]
                    output = output.replace(second["ips"][0]["address"], "ETH1-ADDRESS")
                    outputs[name] = (page, output + after)
                    # the pod's process dies (kabuto: its VMM): delete --force still removes it all
                    runtime.kill_holder(sandbox_id)
                finally:
                    runtime.delete(sandbox_id)
                if name == "kabuto":
                    # the taps and their tc redirects went with the dead VM's sandbox; CNI's stay
                    assert links(pod.name) == ["eth0", "lo"]
                    assert ingress_leftovers(pod.name) == []
            finally:
                pod.close()
    finally:
        httpd.kill()
        httpd.wait(timeout=10)
        server.close()
    assert netns_left(made) == []
    expected = f"{MTU}\n{PAGE}ETH1-ADDRESS\nsecond-gateway-reached\n{digest}\neth0\n"
    assert outputs["runc"] == (PAGE, expected), outputs["runc"]
    assert outputs["kabuto"] == outputs["runc"]
