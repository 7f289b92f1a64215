"""Factory cache mode against real QEMU and the shipped image: `kabuto factory serve` keeps a VM
booted, and the CLI, the Python API and containerd's shim each start a container in one; the
daemon refills; an empty cache and a daemon killed mid-request mean a cold boot with a clear
message (no daemon at all, or one that breaks the protocol: tests/unit/test_factory_cache.py);
a pod's NIC reaches a cached VM by descriptor; the daemon's stop leaves nothing.

One daemon (one cached VM) serves the module's tests in order; the mid-request kill has a
daemon of its own.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cni_helpers import CniPod, bridge_config, host_netns_fixture, ingress_leftovers, links, netns_left
from containerd_helpers import CONTAINERD, CTR, Containerd, short_temp_dir
from test_runtime_helpers import (
    KABUTO,
    busybox_rootfs,
    kabuto,
    remove_state_root,
    require_guest_image,
    runtime_leftovers,
)

from kabuto.config.loader import builtin_default_text
from kabuto.runtime.factory import cache_protocol as wire

pytestmark = pytest.mark.vm

RANDOM = ["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"]
#: a TCG boot under a loaded 2-core host; every wait below is bounded by it
BOOT_WAIT = 240.0
STOP_WAIT = 60.0
SUBNET = "198.18.9.0/24"


class Daemon:
    """`kabuto factory serve` as a process of its own, with state under ``root``."""

    def __init__(self, directory: Path, number: int = 1) -> None:
        self.directory = directory
        self.root = directory / "root"
        self.endpoint = directory / "cache.sock"
        self.config = directory / "configuration.toml"
        self.config.write_text(builtin_default_text() + f'\n[factory]\nvm_cache_number = {number}\n'
                               f'vm_cache_endpoint = "{self.endpoint}"\n')
        self.log = directory / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(KABUTO), "--config", str(self.config), "--root", str(self.root), "factory", "serve"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def status(self) -> dict[str, Any] | None:
        async def ask() -> dict[str, Any]:
            reader, writer = await asyncio.open_unix_connection(str(self.endpoint))
            try:
                await wire.send(writer, {"op": "status"})
                return await wire.receive(reader)
            finally:
                writer.close()
        try:
            return asyncio.run(ask())
        except (OSError, wire.CacheProtocolError):
            return None

    def wait_ready(self, number: int = 1) -> dict[str, Any]:
        """Poll until ``number`` VMs are ready (the daemon boots them in the background)."""
        deadline = time.monotonic() + BOOT_WAIT
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_text()
            status = self.status()
            if status is not None and status["ready"] >= number:
                return status
            time.sleep(0.2)
        raise AssertionError(f"no {number} cached VM(s) within {BOOT_WAIT}s:\n{self.log_text()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_WAIT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def run(self, *args: str, debug: bool = True) -> subprocess.CompletedProcess[bytes]:
        return kabuto(self.root, "--config", str(self.config), *(["--debug"] if debug else []), *args)


def taken_from_cache(result: subprocess.CompletedProcess[bytes]) -> bool:
    return b"from the factory cache" in result.stderr


def errors(result: subprocess.CompletedProcess[bytes]) -> str:
    return "\n".join(line for line in result.stderr.decode(errors="replace").splitlines()
                     if "level=debug" not in line)


def vm_processes(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in arg for arg in process.info.get("cmdline") or []) \
                    and process.status() != psutil.STATUS_ZOMBIE and "factory" not in process.info["cmdline"]:
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    require_guest_image()
    directory = short_temp_dir("kbf-")
    served = Daemon(directory)
    try:
        served.start()
        yield served
    finally:
        if served.process is not None and served.process.poll() is None:
            served.process.kill()
        remove_state_root(directory)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_rootfs(tmp_path_factory.mktemp("rootfs"))


def test_cli_runs_in_a_cached_vm_and_the_daemon_refills(daemon: Daemon, tmp_path: Path) -> None:
    daemon.wait_ready()
    result = daemon.run("run", "--busybox", "--", *RANDOM)
    assert result.returncode == 0, errors(result)
    assert taken_from_cache(result), errors(result)
    (tmp_path.parent / "random-cli").write_bytes(result.stdout)
    status = daemon.wait_ready()
    assert status["handed_out"] == 1 and status["failed_boots"] == 0, status
    assert runtime_leftovers_beside_the_cache(daemon) == []


def runtime_leftovers_beside_the_cache(daemon: Daemon) -> list[str]:
    """What the sandboxes left: anything but the daemon's own VMs (their VM directories, cache
    entries and processes)."""
    held = {p.name for p in (daemon.root / ".cache").glob("*") if (p / "owner.json").exists()}
    assert daemon.process is not None
    return [item for item in runtime_leftovers(daemon.root)
            if not any(vm_id in item for vm_id in held) and not item.endswith("/.cache")
            and not item.startswith(f"process {daemon.process.pid}:")]


def test_api_runs_in_a_cached_vm_and_an_empty_cache_boots_cold(daemon: Daemon, tmp_path: Path) -> None:
    import kabuto as api

    daemon.wait_ready()
    with api.Sandbox(config=str(daemon.config), state_root=daemon.root) as sandbox:
        result = sandbox.run(RANDOM)
        assert result.exit_code == 0, result.stderr
        # the daemon's one VM is this sandbox's now: the next start finds the cache empty
        cold = daemon.run("run", "--busybox", "--", "true")
        assert cold.returncode == 0, errors(cold)
        assert not taken_from_cache(cold) and b"the cache is empty" in cold.stderr, errors(cold)
    # clones are not twins: two cached VMs read different random bytes
    other = (tmp_path.parent / "random-cli").read_bytes()
    assert len(result.stdout) == 32 and len(other) == 32 and result.stdout != other, (result.stdout, other)
    status = daemon.wait_ready()
    assert status["handed_out"] == 2, status
    assert runtime_leftovers_beside_the_cache(daemon) == []


@pytest.mark.skipif(not (CONTAINERD.is_file() and CTR.is_file()),
                    reason="containerd is not installed (apt-get install containerd)")
def test_containerd_shim_runs_in_a_cached_vm(daemon: Daemon, rootfs: Path) -> None:
    daemon.wait_ready()
    directory = short_temp_dir("kbc-")
    containerd = Containerd(directory, daemon.root, {"KABUTO_CONFIG": str(daemon.config)})
    try:
        containerd.start()
        result = containerd.ctr("run", "--runtime", "io.containerd.kabuto.v2", "--fifo-dir",
                                str(containerd.fifo_dir), "--rm", "--rootfs", str(rootfs), "cached",
                                "/bin/sh", "-c", "echo in-a-cached-vm")
        assert (result.returncode, result.stdout) == (0, b"in-a-cached-vm\n"), containerd.explain(result)
        # the shim's log goes to containerd's: the VM came from the cache
        status = daemon.wait_ready()
        assert status["handed_out"] == 3, (status, containerd.log_tail())
        deadline = time.monotonic() + STOP_WAIT
        while containerd.shims() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert containerd.shims() == []
    finally:
        containerd.stop()
        remove_state_root(directory)
    assert runtime_leftovers_beside_the_cache(daemon) == []


@pytest.fixture
def host_netns() -> Iterator[str]:
    yield from host_netns_fixture()


def test_a_pod_nic_reaches_a_cached_vm_by_descriptor(daemon: Daemon, host_netns: str, tmp_path: Path) -> None:
    daemon.wait_ready()
    pod = CniPod(host_netns, bridge_config(SUBNET, tmp_path / "ipam", bridge="kbt-brf"))
    try:
        address = pod.result["ips"][0]["address"]
        result = daemon.run("run", "--busybox", "--net", pod.path, "--", "sh", "-c",
                            "ip -o -4 addr show eth0 | awk '{print $4}'; cat /sys/class/net/eth0/operstate")
        assert result.returncode == 0, errors(result)
        assert taken_from_cache(result), errors(result)
        assert result.stdout.decode().split() == [address, "up"], errors(result)
        # the VMM never ran in the pod's netns; its tap and redirects went with the sandbox
        assert links(pod.name) == ["eth0", "lo"] and ingress_leftovers(pod.name) == []
    finally:
        pod.close()
    assert netns_left([pod.name]) == []
    assert runtime_leftovers_beside_the_cache(daemon) == []


def test_daemon_stop_leaves_no_vm_socket_or_directory(daemon: Daemon) -> None:
    daemon.wait_ready()
    held = [p.pid for p in vm_processes(daemon.root)]
    assert held, "the daemon holds a VM"
    assert daemon.stop() == 0, daemon.log_text()
    assert vm_processes(daemon.root) == []
    assert not daemon.endpoint.exists()
    assert runtime_leftovers(daemon.root) == []


def listen_backlog(endpoint: Path) -> int:
    """Connections waiting on the Unix socket listening at ``endpoint`` (ss's Recv-Q)."""
    shown = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, timeout=10, check=True).stdout
    for line in shown.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == str(endpoint):
            return int(fields[2])
    return 0


def test_daemon_killed_mid_request_means_a_cold_boot_and_nothing_left() -> None:
    require_guest_image()
    directory = short_temp_dir("kbk-")
    daemon = Daemon(directory)
    client: subprocess.Popen[bytes] | None = None
    try:
        daemon.start()
        daemon.wait_ready()
        assert daemon.process is not None
        # stopped, it accepts no connection: the client waits on its request
        daemon.process.send_signal(signal.SIGSTOP)
        stderr = directory / "client.err"
        with open(stderr, "wb") as err:
            client = subprocess.Popen([str(KABUTO), "--config", str(daemon.config), "--root",
                                       str(daemon.root), "run", "--busybox", "--", "echo", "cold"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        deadline = time.monotonic() + 60
        while listen_backlog(daemon.endpoint) < 1:
            assert time.monotonic() < deadline and client.poll() is None, "the client never connected"
            time.sleep(0.05)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(timeout=STOP_WAIT)
        out, _ = client.communicate(timeout=BOOT_WAIT)
        message = stderr.read_text()
        assert (client.returncode, out) == (0, b"cold\n"), message
        assert "failed mid-request" in message and "booting a VM cold" in message, message
        # the dead daemon's VM was reaped by the client that found it gone; only its socket file stays
        assert "left by a cache daemon that died" in message, message
        assert vm_processes(daemon.root) == []
        assert runtime_leftovers(daemon.root) == []
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
        remove_state_root(directory)
