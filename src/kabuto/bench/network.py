"""The network section of `make bench`: a Kabuto pod on a CNI bridge, against a runc container on the
same bridge and against a bare QEMU guest behind the same kind of tap and tc redirects (the TCG
floor: the same virtio-net path with no agent, runtime or container around it).

Debian's CNI plugins (bridge, host-local, loopback) make three pod netns from a netns standing for
the host, with CNI's environment-and-stdin protocol; every address is inside those namespaces. Each
side serves the same busybox httpd from a tmpfs (a small file and a BIG_MIB one), and one client in
the host netns measures, run by run and side by side: the download throughput of the big file
(TCP, container to host) and the median time of REQUESTS small requests, each a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kabuto
from kabuto.bench.floor import bare_qemu_args, pack_initrd
from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor import resolve_config
from kabuto.runtime import network
from kabuto.runtime.bundle import default_spec, join_network_namespace
from kabuto.runtime.busybox import make_busybox_rootfs

Row = Callable[..., dict[str, object]]
CNI_PATH = Path("/usr/lib/cni")
SUBNET = "198.18.30.0/24"
BRIDGE = "kbbench0"
PORT = 8000
BIG_MIB = 32
REQUESTS = 20
COMMAND_TIMEOUT = 60.0
CLIENT_TIMEOUT = 300.0
SERVE = ("mkdir -p {root} && echo pong > {root}/small && "
         f"dd if=/dev/zero of={{root}}/big bs=1M count={BIG_MIB} 2>/dev/null && "
         f"exec httpd -f -p {PORT} -h {{root}}")
# the floor's /bench-init: the image's own initrd (its modules, its busybox) and this script
BARE_INIT = """#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
modules=/lib/modules/boot-modules
[ -f $modules ] && while read -r module; do insmod "$module"; done < $modules
mount -t tmpfs tmpfs /tmp
ip link set lo up; ip link set eth0 mtu {mtu} up; ip addr add {address} dev eth0
{serve}
"""
# Run in the host netns: GET the big file (MB/s from the first byte to the last), then REQUESTS
# small GETs (each its own connection), retrying the first connect until the server listens.
CLIENT = r"""
import json, socket, statistics, sys, time
host, port, big, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def get(path):  # (the response's first 64 KiB, its length, when its first byte came)
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        head, length, first, buffer = b"", 0, None, bytearray(1 << 20)
        while count := s.recv_into(buffer):
            first = first or time.monotonic()
            if len(head) < 1 << 16:
                head += buffer[:count]
            length += count
        return head, length, first
deadline = time.monotonic() + 120
while True:
    try:
        get("small")
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
head, length, first = get("big")
seconds = time.monotonic() - first
body = length - len(head.partition(b"\r\n\r\n")[0]) - 4
if body != big:
    sys.exit(f"big: {body} bytes, not {big}")
latencies = []
for _ in range(requests):
    start = time.monotonic()
    head, _, _ = get("small")
    latencies.append(time.monotonic() - start)
    if not head.endswith(b"pong\n"):
        sys.exit(f"small: {head[-80:]!r}")
print(json.dumps({"mbps": big / 2**20 / seconds, "latency": statistics.median(latencies)}))
"""


def _sh(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    return done.stdout


def bridge_config(state: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "kabuto-bench", "type": "bridge", "bridge": BRIDGE,
            "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "subnet": SUBNET, "dataDir": str(state)}}


@dataclass
class Pod:
    """A pod netns CNI made (run in ``host``): its name and the address eth0 got (with prefix)."""

    name: str
    address: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


def _cni(command: str, host: str, pod: str, config: dict[str, Any], ifname: str) -> str:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod, "CNI_NETNS": f"/run/netns/{pod}",
           "CNI_IFNAME": ifname, "CNI_PATH": str(CNI_PATH), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return _sh("ip", "netns", "exec", host, str(CNI_PATH / config["type"]), stdin=json.dumps(config), env=env)


@contextlib.contextmanager
def cni_pods(count: int, work: Path) -> Iterator[tuple[str, list[Pod]]]:
    """A host netns and ``count`` pods on one CNI bridge in it; all of it removed afterwards."""
    for binary in ("bridge", "host-local", "loopback"):
        if not (CNI_PATH / binary).exists():
            raise RuntimeError(f"{CNI_PATH / binary} is missing (Debian's containernetworking-plugins)")
    made: list[str] = []
    added: list[str] = []
    config = bridge_config(work / "ipam")
    loopback = {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}
    host = f"kbbh-{secrets.token_hex(4)}"
    try:
        _sh("ip", "netns", "add", host)
        made.append(host)
        _sh("ip", "-n", host, "link", "set", "lo", "up")
        pods = []
        for _ in range(count):
            name = f"kbbp-{secrets.token_hex(4)}"
            _sh("ip", "netns", "add", name)
            made.append(name)
            _cni("ADD", host, name, loopback, "lo")
            result = json.loads(_cni("ADD", host, name, config, "eth0"))
            added.append(name)
            pods.append(Pod(name, result["ips"][0]["address"]))
        yield host, pods
    finally:
        for name in added:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                _cni("DEL", host, name, config, "eth0")
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT)


async def measure(host: str, pod: Pod) -> dict[str, float]:
    """One client run from the host netns against ``pod``'s server."""
    args = ["ip", "netns", "exec", host, sys.executable, "-c", CLIENT, pod.ip, str(PORT),
            str(BIG_MIB << 20), str(REQUESTS)]
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True,
                                   timeout=CLIENT_TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"network client against {pod.ip}: {done.stderr[-400:]}")
    return json.loads(done.stdout)


@contextlib.asynccontextmanager
async def kabuto_server(pod: Pod, rootfs: Path) -> AsyncIterator[None]:
    async with kabuto.AsyncSandbox(rootfs=rootfs, netns=pod.path) as sandbox:
        server = await sandbox.spawn(["sh", "-c", SERVE.format(root="/dev/shm/www")])
        try:
            yield
        finally:
            await server.kill(9)
            await server.wait()


@contextlib.contextmanager
def runc_server(pod: Pod, rootfs: Path, work: Path) -> Iterator[None]:
    container = f"kabuto-bench-net-{secrets.token_hex(3)}"
    bundle = work / "runc-net-bundle"
    bundle.mkdir()
    spec = default_spec(["sh", "-c", SERVE.format(root="/dev/shm/www")], str(rootfs))
    join_network_namespace(spec, pod.path)
    (bundle / "config.json").write_text(json.dumps(spec))
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["runc", "run", "-d", "-b", str(bundle), container], check=True, timeout=COMMAND_TIMEOUT,
                   **quiet)
    try:
        yield
    finally:
        subprocess.run(["runc", "delete", "--force", container], check=False, timeout=COMMAND_TIMEOUT,
                       **quiet)


def bare_initrd(base_initrd: Path, dest: Path, address: str, mtu: int) -> Path:
    script = BARE_INIT.format(address=address, mtu=mtu, serve=SERVE.format(root="/tmp/www")).encode()
    extra = pack_initrd(dest.with_suffix(".extra"), {"bench-init": script})
    base = base_initrd.read_bytes()
    # an uncompressed base needs its archive padded to 4 bytes before the next one starts
    dest.write_bytes(base + b"\0" * (-len(base) % 4) + extra.read_bytes())
    extra.unlink()
    return dest


@contextlib.asynccontextmanager
async def bare_server(pod: Pod, table: HypervisorConfig, work: Path) -> AsyncIterator[None]:
    """QEMU with nothing but the image's kernel, an init that serves, and a virtio-net NIC on a
    tap that runtime.network connected to the pod's eth0 exactly as for a Kabuto sandbox."""
    [endpoint] = await network.scan(pod.path)
    tap = await network.attach(pod.path, endpoint)
    assert tap is not None
    proc = None
    try:
        initrd = bare_initrd(Path(table.initrd), work / "bare-net.img", pod.address, endpoint.interface.mtu)
        args = [
            "ip", "netns", "exec", pod.name,
            *bare_qemu_args(table, table.kernel, initrd, "console=ttyS0 quiet panic=-1 rdinit=/bench-init"),
            "-serial", "null",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,mac={endpoint.interface.mac}",
        ]
        proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        yield
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await network.detach(pod.path, tap)


def rows_from(samples: dict[str, list[dict[str, float]]], row: Row) -> list[dict[str, object]]:
    """Ratios of kabuto against runc and against the bare QEMU floor, for each measure."""
    def series(side: str, key: str) -> list[float]:
        return [sample[key] for sample in samples[side]]

    rows = []
    for floor, label in (("runc", "runc on the same bridge"), ("bare", "bare QEMU, same tap")):
        rows.append(row(f"TCP download {BIG_MIB} MiB: kabuto vs {label}", series("kabuto", "mbps"),
                        series(floor, "mbps"), "MB/s", higher_is_better=True))
        rows.append(row(f"small request, new connection: kabuto vs {label}", series("kabuto", "latency"),
                        series(floor, "latency")))
    return rows


async def network_section(runs: int, work: Path, row: Row) -> list[dict[str, object]]:
    if shutil.which("runc") is None:
        raise RuntimeError("runc is not installed (the network section's baseline)")
    table = resolve_config().table
    rootfs = make_busybox_rootfs(work / "network-rootfs")
    print(f"network ({runs} runs each, interleaved; {table.default_vcpus} vCPU, {table.default_memory} MiB; "
          f"CNI bridge, {BIG_MIB} MiB download, median of {REQUESTS} small requests)")
    with cni_pods(3, work) as (host, (kabuto_pod, runc_pod, bare_pod)):
        sides: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
            "kabuto": lambda: measure(host, kabuto_pod), "runc": lambda: measure(host, runc_pod),
            "bare": lambda: measure(host, bare_pod)}
        samples: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        with runc_server(runc_pod, rootfs, work):
            async with kabuto_server(kabuto_pod, rootfs), bare_server(bare_pod, table, work):
                for _ in range(runs):
                    for side, run in sides.items():
                        samples[side].append(await run())
    return rows_from(samples, row)
