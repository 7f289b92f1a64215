"""The network benchmark's pieces that need no VM: the client against a real busybox httpd serving
what the section's servers serve (in a netns of the test's own), the floor's initrd, the rows."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from netns_helpers import needs_netns, netns, sh

from kabuto.bench import network as bench
from kabuto.bench.__main__ import _row
from kabuto.runtime.busybox import make_busybox_rootfs


@needs_netns
@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_the_client_measures_the_server_the_sides_run(tmp_path: Path) -> None:
    with netns() as host, netns() as pod_name:
        sh("ip", "-n", host, "link", "add", "peer0", "type", "veth", "peer", "name", "eth0", "netns",
           pod_name)
        sh("ip", "-n", host, "addr", "add", "198.18.31.1/24", "dev", "peer0")
        sh("ip", "-n", host, "link", "set", "peer0", "up")
        sh("ip", "-n", pod_name, "addr", "add", "198.18.31.2/24", "dev", "eth0")
        sh("ip", "-n", pod_name, "link", "set", "eth0", "up")
        root = tmp_path / "www"
        busybox = make_busybox_rootfs(tmp_path / "rootfs") / "bin"  # the rootfs's tools, as the sides'
        server = subprocess.Popen(["ip", "netns", "exec", pod_name, "env", "-i", f"PATH={busybox}",
                                   str(busybox / "sh"), "-c", bench.SERVE.format(root=root)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            started = time.monotonic()
            sample = asyncio.run(bench.measure(host, bench.Pod(pod_name, "198.18.31.2/24")))
        finally:
            server.kill()
            server.wait(timeout=10)
    assert set(sample) == {"mbps", "latency"}
    assert sample["mbps"] > 0 and 0 < sample["latency"] < time.monotonic() - started
    assert (root / "big").stat().st_size == bench.BIG_MIB << 20


def test_the_floors_initrd_appends_its_init(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"070701" + b"x" * 5)  # not a multiple of 4: padded before the next archive
    image = bench.bare_initrd(base, tmp_path / "bare.img", "198.18.30.4/24", 1400)
    data = image.read_bytes()
    assert data.startswith(base.read_bytes() + b"\0" * 1)
    extra = gzip.decompress(data[12:])
    assert b"bench-init" in extra
    assert b"ip link set eth0 mtu 1400 up; ip addr add 198.18.30.4/24 dev eth0" in extra
    assert bench.SERVE.format(root="/tmp/www").encode() in extra
    assert not (tmp_path / "bare.extra").exists()


def test_rows_are_kabuto_against_runc_and_the_bare_floor() -> None:
    samples = {"kabuto": [{"mbps": 10.0, "latency": 0.02}] * 3,
               "runc": [{"mbps": 100.0, "latency": 0.001}] * 3,
               "bare": [{"mbps": 20.0, "latency": 0.01}] * 3}
    rows = bench.rows_from(samples, _row)
    assert [(r["name"], r["ratio"]) for r in rows] == [
        (f"TCP download {bench.BIG_MIB} MiB: kabuto vs runc on the same bridge", 10.0),
        ("small request, new connection: kabuto vs runc on the same bridge", 20.0),
        (f"TCP download {bench.BIG_MIB} MiB: kabuto vs bare QEMU, same tap", 2.0),
        ("small request, new connection: kabuto vs bare QEMU, same tap", 2.0)]
