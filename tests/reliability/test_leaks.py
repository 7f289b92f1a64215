"""Leaks: N create/run/delete cycles through the CLI and through the Python API, each boot a real
VM of the shipped image in a pod network namespace (so taps and tc redirects are made and removed
too), with the host's resources counted before and after (host_resources.py): equal.

N is LEAK_CYCLES in make test and SOAK_CYCLES under make soak (KABUTO_SOAK=1); the cost of a cycle
is measured and written to the figures (docs/reliability.md).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from host_resources import Scope, count, differences
from reliability_support import Figures, scale
from test_runtime_helpers import (
    KABUTO,
    assert_nothing_left,
    busybox_rootfs,
    require_guest_image,
    write_bundle,
)

import kabuto
from kabuto.runtime.bundle import join_network_namespace

pytestmark = pytest.mark.vm

# a cycle is a TCG boot, ~5 s on an idle 2-core machine (~12 s with other VMs running): 8 per
# entry keep the suite's share of make test near 80 s; make soak runs 300
LEAK_CYCLES = 8
SOAK_CYCLES = 300
CYCLE_TIMEOUT = 300.0


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A netns like the one CNI leaves: eth0 (one end of a veth pair) with an address and a route."""
    name = f"kbl-{secrets.token_hex(4)}"
    commands = [["ip", "netns", "add", name],
                ["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
                ["ip", "-n", name, "addr", "add", "198.18.9.2/24", "dev", "eth0"],
                ["ip", "-n", name, "link", "set", "peer0", "up"],
                ["ip", "-n", name, "link", "set", "eth0", "up"],
                ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.fixture
def temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private TMPDIR (the CLI's and the API's throw-away bundles go there), to be counted.
    (``tmp_path`` first: pytest's own temporary root must not be made inside it.)"""
    directory = Path(tempfile.mkdtemp(prefix="kbt-tmp-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    try:
        yield directory
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def assert_no_leak(before: dict[str, int], after: dict[str, int], cycles: int, figures: Figures,
                   seconds: float) -> None:
    figures["cycles"] = cycles
    figures["seconds_per_cycle"] = round(seconds / cycles, 2)
    figures["counted"] = before
    figures["leaked"] = {name: b - a for name, (a, b) in differences(before, after).items()}
    assert not differences(before, after), f"after {cycles} cycles: {differences(before, after)}"


def test_cli_run_cycles_leave_nothing(state_root: Path, temp_dir: Path, pod_netns: str, tmp_path: Path,
                                      figures: Figures) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    bundle = write_bundle(tmp_path / "bundle", rootfs, ["sh", "-c", "ip -o -4 addr show eth0"],
                          change=lambda spec: join_network_namespace(spec, f"/run/netns/{pod_netns}"))
    scope = Scope(state_root, temp_dir, pod_netns)
    env = {**os.environ, "KABUTO_STATE_ROOT": str(state_root), "TMPDIR": str(temp_dir)}
    cycles = scale(LEAK_CYCLES, SOAK_CYCLES)

    def cycle(number: int) -> None:
        done = subprocess.run([str(KABUTO), "run", "--bundle", str(bundle), f"leak{number}"], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=CYCLE_TIMEOUT)
        assert done.returncode == 0 and b"198.18.9.2/24" in done.stdout and done.stderr == b"", \
            (number, done)

    cycle(-1)  # the first makes what every later one shares: the state root's lock and VM directory
    before = count(scope)
    started = time.monotonic()
    for number in range(cycles):
        cycle(number)
    seconds = time.monotonic() - started
    assert_no_leak(before, count(scope), cycles, figures, seconds)
    assert_nothing_left(state_root)


async def test_api_sandbox_cycles_leave_nothing(state_root: Path, temp_dir: Path, pod_netns: str,
                                                figures: Figures) -> None:
    require_guest_image()
    scope = Scope(state_root, temp_dir, pod_netns)
    cycles = scale(LEAK_CYCLES, SOAK_CYCLES)
    # the first sandbox loads what every later one shares (modules, the image's metadata); while
    # it runs, the counts show what a sandbox holds, so a count that cannot see it would fail here
    async with kabuto.AsyncSandbox(state_root=state_root, netns=f"/run/netns/{pod_netns}") as sb:
        await sb.run(["true"])
        during = count(scope)
    before = count(scope)
    figures["held_by_one_sandbox"] = {name: during[name] - before[name] for name in before
                                      if during[name] != before[name]}
    for name in ("processes naming the state root", "mounts below the state root",
                 "unix sockets below the state root", "links in the pod netns",
                 "tc filters in the pod netns"):
        assert during[name] > before[name], (name, during, before)
    started = time.monotonic()
    for cycle in range(cycles):
        async with kabuto.AsyncSandbox(state_root=state_root, netns=f"/run/netns/{pod_netns}") as sb:
            result = await sb.run(["ip", "-o", "-4", "addr", "show", "eth0"])
            assert result.exit_code == 0 and b"198.18.9.2/24" in result.stdout, (cycle, result)
    seconds = time.monotonic() - started
    assert_no_leak(before, count(scope), cycles, figures, seconds)
    assert_nothing_left(state_root)
