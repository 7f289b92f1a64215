"""The runtime's lifecycle logic against a fake VMM and a fake guest agent.

The fake VMM is a real process (``sleep``) started in its own session, so "the VMM died" is
a real kill and the leftover check sees real processes; the shared-fs rootfs is a real bind
mount. Only the guest is simulated: a ContainerService double keyed by VM id, so that every
``attach`` (as a later CLI process would do) finds the same guest again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netns_helpers
import psutil
import pytest

from kabuto.agent.containers import ContainerCallError, ContainerStats
from kabuto.config import loader
from kabuto.errors import AgentError, KabutoError
from kabuto.hypervisor import registry
from kabuto.hypervisor.base import Hypervisor, HypervisorState, VcpuThreadIds, VmStatus
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import AgentChannel, ChannelKind, DeviceKind, SharedFsKind
from kabuto.hypervisor.plugin import Availability, BasePlugin
from kabuto.runtime import bundle as bundle_module
from kabuto.runtime import commands, control, streaming
from kabuto.runtime import sandbox as sandbox_module
from kabuto.runtime.bundle import BundleError, ContainerIdError, default_spec
from kabuto.runtime.sandbox import SandboxError
from kabuto.runtime.state import StateStore
from kabuto.ttrpc.status import Code

GUESTS: dict[str, FakeGuest] = {}


# -- fake VMM ----------------------------------------------------------------------------------
class FakeVmm(Hypervisor):
    name = "fakevmm"
    capabilities = Capabilities(shared_fs=frozenset({SharedFsKind.VIRTIO_9P}))

    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self.id = id
        self.vm_path.mkdir(parents=True)
        self.agent_channel = AgentChannel("agent", ChannelKind.VIRTIO_SERIAL, socket_path=Path("/fake"))
        self.status = VmStatus.PREPARED

    async def start_vm(self, timeout: float) -> None:
        # the VM path on the command line lets the leftover check find a surviving "VMM"
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(600)", str(self.vm_path), start_new_session=True)
        process = self.process
        self.pid = process.pid
        self.create_time = psutil.Process(process.pid).create_time()
        GUESTS[self.id] = FakeGuest()
        self.devices.extend(self.pending_devices)
        for index, device in enumerate(self.devices):
            if device.kind == DeviceKind.BLOCK:
                device.guest_address = f"/dev/vd{chr(ord('b') + index)}"
        self.pending_devices.clear()
        self.status = VmStatus.RUNNING

    def _alive(self) -> bool:
        try:
            process = psutil.Process(getattr(self, "pid", 0))
            return process.create_time() == self.create_time and process.status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError):
            return False

    async def stop_vm(self) -> None:
        await self._kill()
        self.status = VmStatus.STOPPED

    async def _kill(self) -> None:
        if self._alive():
            os.kill(self.pid, signal.SIGKILL)
        process = getattr(self, "process", None)
        if process is not None:
            await process.wait()

    async def cleanup(self) -> None:
        await self._kill()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        self.status = VmStatus.STOPPED

    async def get_pids(self) -> list[int]:
        return [self.pid] if self._alive() else []

    async def save_state(self) -> HypervisorState:
        return await self._state({"create_time": getattr(self, "create_time", 0.0)})

    async def _take_over(self, state: HypervisorState) -> None:
        self.pid = state.pids[0] if state.pids else 0
        self.create_time = state.extra["create_time"]
        self.status = VmStatus.RUNNING if self._alive() else VmStatus.STOPPED

    async def pause_vm(self) -> None: ...
    async def resume_vm(self) -> None: ...
    async def save_vm(self) -> Path: raise NotImplementedError
    async def disconnect(self) -> None: ...
    async def get_thread_ids(self) -> VcpuThreadIds: return VcpuThreadIds()
    async def check(self) -> None: ...


class BlockOnlyVmm(FakeVmm):
    name = "fakeblock"
    capabilities = Capabilities()


class NetVmm(FakeVmm):
    """A fake VMM with virtio-net NICs, cold- and hot-plugged (the hot-plug only recorded)."""

    name = "fakenet"
    capabilities = Capabilities(shared_fs=frozenset({SharedFsKind.VIRTIO_9P}), network=True,
                                hotplug=frozenset({DeviceKind.NETWORK}))

    async def _hotplug_add(self, device: Any) -> None: ...
    async def _hotplug_remove(self, device: Any) -> None: ...


class ColdNetVmm(NetVmm):
    """NICs at boot only, as Firecracker."""

    name = "fakecoldnet"
    capabilities = Capabilities(shared_fs=frozenset({SharedFsKind.VIRTIO_9P}), network=True)


class FakePlugin(BasePlugin):
    def __init__(self, backend_class: type[Hypervisor]) -> None:
        self.backend_class = backend_class

    def adjust(self, table: Any) -> None:
        # as a real plugin does: the backend's shared filesystem unless the table names one
        if not table.shared_fs:
            table.shared_fs = "virtio-9p" if self.backend_class.capabilities.shared_fs else "none"
    def validate(self, table: Any) -> list[Any]: return []
    def capabilities(self) -> Capabilities: return self.backend_class.capabilities
    def availability(self, table: Any) -> Availability: return Availability(True)
    def backend(self) -> type[Hypervisor]: return self.backend_class


# -- fake guest --------------------------------------------------------------------------------
@dataclass
class FakeProcess:
    args: list[str]
    stdout: bytearray = field(default_factory=bytearray)
    stdin: bytearray = field(default_factory=bytearray)
    exit_status: int | None = None


@dataclass
class FakeGuest:
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sandbox_created: bool = False
    storages: list[Any] = field(default_factory=list)
    create_sandbox_timeout: float | None = None
    interfaces: dict[str, Any] = field(default_factory=dict)
    routes: list[Any] = field(default_factory=list)

    def process(self, cid: str, eid: str) -> FakeProcess:
        try:
            return self.containers[cid]["processes"][eid]
        except KeyError:
            raise ContainerCallError("fake", "call", Code.NOT_FOUND, f"no process {cid}/{eid}") from None


def behave(process: FakeProcess) -> None:
    """``echo`` and ``exit N`` finish at once; ``oom`` is SIGKILLed by the guest's OOM killer at
    once; ``cat`` echoes stdin at close; the rest run until signalled."""
    if process.args[0] == "echo":
        process.stdout += (" ".join(process.args[1:]) + "\n").encode()
        process.exit_status = 0
    elif process.args[0] == "exit":
        process.exit_status = int(process.args[1])
    elif process.args[0] == "oom":
        process.exit_status = 128 + 9


async def until(condition: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01) + 1):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise ContainerCallError("fake", "poll", Code.DEADLINE_EXCEEDED, "fake long poll ran out")


class FakeContainers:
    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest

    async def create_sandbox(self, *, hostname: str, storages: list[Any], sandbox_id: str,
                             timeout: float | None = None) -> None:
        self.guest.sandbox_created = True
        self.guest.storages = storages
        self.guest.create_sandbox_timeout = timeout

    async def create_container(self, cid: str, spec_json: bytes, *, rootfs: Any,
                               timeout: float | None = None) -> int:
        if cid in self.guest.containers:
            raise ContainerCallError("fake", "CreateContainer", Code.ALREADY_EXISTS, f"{cid} exists")
        spec = json.loads(spec_json)
        if spec["process"]["args"][0] == "missing-binary":
            raise ContainerCallError("fake", "CreateContainer", Code.INVALID_ARGUMENT,
                                     "executable file not found")
        self.guest.containers[cid] = {"spec": spec, "rootfs": rootfs, "started": False, "timeout": timeout,
                                      "processes": {"": FakeProcess(spec["process"]["args"])}}
        return 1

    async def start_container(self, cid: str) -> int:
        self.guest.containers[cid]["started"] = True
        behave(self.guest.process(cid, ""))
        return 1

    async def stats_container(self, cid: str) -> ContainerStats:
        """Only the OOM kills are known: one for a container whose init is ``oom``."""
        oom = self.guest.process(cid, "").args[0] == "oom"
        return ContainerStats(None, None, None, None, None, None, None, memory_oom_kills=1 if oom else 0)

    async def exec_process(self, cid: str, eid: str, process_json: bytes) -> int:
        process = FakeProcess(json.loads(process_json)["args"])
        self.guest.containers[cid]["processes"][eid] = process
        behave(process)
        return 2

    async def wait_process(self, cid: str, eid: str, timeout: float | None = None) -> int:
        process = self.guest.process(cid, eid)
        if timeout is not None:
            try:
                await until(lambda: process.exit_status is not None, timeout)
            except ContainerCallError:
                raise AgentError(f"WaitProcess: no answer within {timeout:g}s") from None
        await until(lambda: process.exit_status is not None)
        assert process.exit_status is not None
        return process.exit_status

    async def signal_process(self, cid: str, eid: str, number: int, *, all_processes: bool = False) -> None:
        process = self.guest.process(cid, eid)
        if process.exit_status is not None:
            raise ContainerCallError("fake", "SignalProcess", Code.NOT_FOUND, "process exited")
        # PID 1 of the container ignores signals it has no handler for, except SIGKILL
        if eid or number == signal.SIGKILL:
            process.exit_status = 128 + number

    async def read_stdout(self, cid: str, eid: str, max_len: int) -> bytes:
        process = self.guest.process(cid, eid)
        await until(lambda: bool(process.stdout) or process.exit_status is not None)
        data = bytes(process.stdout[:max_len])
        del process.stdout[:max_len]
        return data

    async def read_stderr(self, cid: str, eid: str, max_len: int) -> bytes:
        process = self.guest.process(cid, eid)
        await until(lambda: process.exit_status is not None)
        return b""

    async def write_stdin(self, cid: str, eid: str, data: bytes) -> int:
        self.guest.process(cid, eid).stdin += data
        return len(data)

    async def close_stdin(self, cid: str, eid: str) -> None:
        process = self.guest.process(cid, eid)
        if process.args[0] == "cat" and process.exit_status is None:
            process.stdout += process.stdin
            process.exit_status = 0

    async def list_processes(self, cid: str) -> list[int]:
        processes = self.guest.containers[cid]["processes"].values()
        return [1 + i for i, p in enumerate(processes) if p.exit_status is None]

    async def remove_container(self, cid: str) -> None:
        self.guest.containers.pop(cid)

    async def destroy_sandbox(self) -> None:
        self.guest.containers.clear()

    async def update_interface(self, interface: Any) -> Any:
        self.guest.interfaces[interface.name] = interface
        return interface

    async def update_routes(self, routes: list[Any]) -> list[Any]:
        self.guest.routes += routes
        return routes

    async def add_arp_neighbors(self, neighbors: list[Any]) -> None: ...


class FakeAgent:
    def __init__(self, address: str, timeout: float, **kwargs: Any) -> None:
        self.address = address
        self.closed = False
        #: how wait_for_agent was asked to reach it
        self.waits = {"timeout": timeout, **kwargs}

    async def close(self) -> None: ...


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    registry.registered_names()
    monkeypatch.setattr(registry, "_plugins", dict(registry._plugins))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    registry.register_hypervisor_plugin("fakevmm", FakePlugin(FakeVmm))
    registry.register_hypervisor_plugin("fakeblock", FakePlugin(BlockOnlyVmm))
    registry.register_hypervisor_plugin("fakenet", FakePlugin(NetVmm))
    registry.register_hypervisor_plugin("fakecoldnet", FakePlugin(ColdNetVmm))
    current: dict[str, str] = {}

    async def fake_wait_for_agent(address: str, timeout: float, **kwargs: Any) -> FakeAgent:
        return FakeAgent(address, timeout, **kwargs)

    original_connect = sandbox_module.VirtSandbox.connect

    async def connect(self: sandbox_module.VirtSandbox, timeout: float | None = None) -> None:
        current["id"] = self.id
        await original_connect(self, timeout)

    monkeypatch.setattr(sandbox_module, "wait_for_agent", fake_wait_for_agent)
    monkeypatch.setattr(sandbox_module.VirtSandbox, "connect", connect)
    monkeypatch.setattr(sandbox_module, "container_client",
                        lambda agent: FakeContainers(GUESTS[current["id"]]))
    monkeypatch.setattr(sandbox_module, "_agent_storage", lambda storage: storage)
    GUESTS.clear()
    yield
    GUESTS.clear()


def runtime_leftovers(root: Path) -> list[str]:
    """Processes naming ``root``, mounts under it, and any path in it but the lock file and the
    (empty) VM directory root: what a removed sandbox must not leave."""
    # status read with cmdline: a process that ends meanwhile is skipped, not an error
    found = [f"process {p.pid}" for p in psutil.process_iter(["cmdline", "status"])
             if any(str(root) in arg for arg in p.info.get("cmdline") or [])
             and p.info.get("status") != psutil.STATUS_ZOMBIE]
    with open("/proc/self/mounts") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts if line.split()[1].startswith(str(root))]
    if root.exists():
        found += [f"path {p}" for p in root.rglob("*")
                  if p.relative_to(root).parts[0] not in (".lock", ".vm")]
        found += [f"path {p}" for p in (root / ".vm").glob("*")]
    return found


def mounts_below(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(f"{root}/")]


@pytest.fixture
def store() -> Iterator[StateStore]:
    root = Path(tempfile.mkdtemp(prefix="kbr-", dir="/tmp"))
    try:
        yield StateStore(root)
        leftovers = runtime_leftovers(root)
        assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if any(str(root) in arg for arg in process.info.get("cmdline") or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        for mount_point in sorted(mounts_below(root), reverse=True):
            subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def options(store: StateStore, hypervisor: str = "fakevmm") -> commands.RuntimeOptions:
    return commands.RuntimeOptions(store, None, hypervisor, 5.0)


def make_bundle(directory: Path, args: list[str], **annotations: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rootfs = directory / "rootfs"
    rootfs.mkdir(exist_ok=True)
    (rootfs / "marker").write_text("in the rootfs")
    spec = default_spec(args)
    spec["annotations"] = dict(annotations)
    (directory / "config.json").write_text(json.dumps(spec))
    return directory


def exists(path: Path) -> bool:
    return path.exists()


def debugfs_cat(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True,
                          check=True).stdout


class Output:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()

    def io(self, stdin: bytes | None = None) -> streaming.ProcessIO:
        async def out(data: bytes) -> None:
            self.stdout.extend(data)

        async def err(data: bytes) -> None:
            self.stderr.extend(data)

        async def chunks() -> Any:
            yield stdin

        return streaming.ProcessIO(out, err, chunks() if stdin else None)


# -- tests -------------------------------------------------------------------------------------
async def test_create_start_state_kill_delete(store: StateStore, tmp_path: Path) -> None:
    opts = options(store)
    bundle = make_bundle(tmp_path / "b1", ["sleep"])
    sandbox = await commands.create("c1", str(bundle), opts)
    await sandbox.disconnect()
    # the rootfs is shared through one bind mount under the sandbox's share directory
    shared = Path(sandbox.record.shared_dir) / "c1" / "rootfs"
    assert (shared / "marker").read_text() == "in the rootfs"
    state = await commands.state("c1", opts)
    assert state["status"] == "created" and state["id"] == "c1" and state["bundle"] == str(bundle)
    assert state["pid"] > 0 and psutil.pid_exists(state["pid"])
    await commands.start("c1", opts)
    assert (await commands.state("c1", opts))["status"] == "running"
    with pytest.raises(SandboxError, match="not stopped: running"):
        await commands.delete("c1", opts)
    assert await commands.ps("c1", opts) == [1]
    await commands.kill("c1", "TERM", opts)  # PID 1 without a handler ignores it
    assert (await commands.state("c1", opts))["status"] == "running"
    await commands.kill("c1", "9", opts)
    state = await commands.state("c1", opts)
    assert state["status"] == "stopped" and state["pid"] == 0
    await commands.delete("c1", opts)
    with pytest.raises(ContainerIdError, match="does not exist"):
        await commands.state("c1", opts)


async def test_run_streams_and_returns_exit_code(store: StateStore, tmp_path: Path) -> None:
    output = Output()
    status = await commands.run("r1", str(make_bundle(tmp_path / "b", ["echo", "hello"])), options(store),
                                output.io())
    assert (status, bytes(output.stdout)) == (0, b"hello\n")
    status = await commands.run("r2", str(make_bundle(tmp_path / "b2", ["exit", "3"])), options(store),
                                Output().io())
    assert status == 3


async def test_run_passes_stdin(store: StateStore, tmp_path: Path) -> None:
    output = Output()
    status = await commands.run("r1", str(make_bundle(tmp_path / "b", ["cat"])), options(store),
                                output.io(b"x" * 100_000))
    assert status == 0 and bytes(output.stdout) == b"x" * 100_000


async def test_exec_and_signal_forwarding(store: StateStore, tmp_path: Path) -> None:
    opts = options(store)
    sandbox = await commands.create("c1", str(make_bundle(tmp_path / "b", ["sleep"])), opts)
    await sandbox.disconnect()
    await commands.start("c1", opts)
    output = Output()
    assert await commands.exec_in("c1", ["echo", "from", "exec"], opts, output.io()) == 0
    assert bytes(output.stdout) == b"from exec\n"

    def forward_sigint_at_once(forward: Any) -> None:
        asyncio.get_running_loop().call_later(0.1, forward, int(signal.SIGINT))

    status = await commands.exec_in("c1", ["sleep"], opts, Output().io(), on_signal=forward_sigint_at_once)
    assert status == 128 + signal.SIGINT
    await commands.delete("c1", opts, force=True)


async def test_duplicate_and_unknown_ids(store: StateStore, tmp_path: Path) -> None:
    opts = options(store)
    bundle = str(make_bundle(tmp_path / "b", ["sleep"]))
    sandbox = await commands.create("c1", bundle, opts)
    await sandbox.disconnect()
    with pytest.raises(ContainerIdError, match="already exists"):
        await commands.create("c1", bundle, opts)
    for operation in (commands.start("nope", opts), commands.state("nope", opts),
                      commands.kill("nope", "KILL", opts), commands.delete("nope", opts)):
        with pytest.raises(ContainerIdError, match="'nope' does not exist"):
            await operation
    await commands.delete("c1", opts)


async def test_bad_bundle_leaves_nothing(store: StateStore, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"config\.json not found"):
        await commands.create("c1", str(tmp_path), options(store))
    with pytest.raises(ContainerIdError, match="invalid container id"):
        await commands.create("../x", str(make_bundle(tmp_path / "b", ["true"])), options(store))


async def test_agent_refusal_stops_the_vm(store: StateStore, tmp_path: Path) -> None:
    with pytest.raises(ContainerCallError, match="executable file not found"):
        await commands.create("c1", str(make_bundle(tmp_path / "b", ["missing-binary"])), options(store))
    assert not GUESTS["c1"].containers


async def test_pod_containers_share_one_vm(store: StateStore, tmp_path: Path) -> None:
    opts = options(store)
    sandbox = await commands.create("pod", str(make_bundle(tmp_path / "p", ["sleep"])), opts)
    await sandbox.disconnect()
    await commands.start("pod", opts)
    pod_annotations = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container",
                       bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    for name in ("app1", "app2"):
        joined = await commands.create(name, str(make_bundle(tmp_path / name, ["sleep"], **pod_annotations)),
                                       opts)
        await joined.disconnect()
        await commands.start(name, opts)
    assert set(GUESTS) == {"pod"} and set(GUESTS["pod"].containers) == {"pod", "app1", "app2"}
    pids = {(await commands.state(n, opts))["pid"] for n in ("pod", "app1", "app2")}
    assert len(pids) == 1
    with pytest.raises(SandboxError, match="still belong to it"):
        await commands.kill("pod", "KILL", opts) or await commands.delete("pod", opts)
    await commands.kill("app1", "KILL", opts)
    await commands.delete("app1", opts)
    assert set(GUESTS["pod"].containers) == {"pod", "app2"}
    await commands.delete("pod", opts, force=True)
    with pytest.raises(ContainerIdError):
        await commands.state("app2", opts)


async def test_dead_vmm_is_noticed_and_cleaned(store: StateStore, tmp_path: Path) -> None:
    opts = options(store)
    sandbox = await commands.create("c1", str(make_bundle(tmp_path / "b", ["sleep"])), opts)
    await sandbox.disconnect()
    await commands.start("c1", opts)
    pid = (await commands.state("c1", opts))["pid"]
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    state = await commands.state("c1", opts)
    assert state["status"] == "stopped"
    # the rootfs mount and the VM directory went as soon as the death was noticed
    assert not exists(Path(sandbox.record.shared_dir, "c1", "rootfs"))
    assert not exists(store.jailer_root / "c1")
    with pytest.raises(SandboxError, match="VM is gone"):
        await commands.exec_in("c1", ["echo"], opts, Output().io())
    await commands.delete("c1", opts)


async def test_block_rootfs_without_shared_fs(store: StateStore, tmp_path: Path) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    opts = options(store, "fakeblock")
    sandbox = await commands.create("c1", str(make_bundle(tmp_path / "b", ["sleep"])), opts)
    rootfs = GUESTS["c1"].containers["c1"]["rootfs"]
    assert (rootfs.source, rootfs.fstype) == ("/dev/vdb", "ext4")
    spec = GUESTS["c1"].containers["c1"]["spec"]
    assert spec["root"]["path"] == rootfs.mount_point
    image = store.sandbox_dir("c1") / "c1.ext4"
    assert debugfs_cat(image, "/marker") == "in the rootfs"
    await sandbox.disconnect()
    # no shared fs and no block hot-plug: a second container cannot join after boot
    pod = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container", bundle_module.SANDBOX_ID_ANNOTATION: "c1"}
    with pytest.raises(SandboxError, match="neither a shared filesystem nor block hot-plug"):
        await commands.create("c2", str(make_bundle(tmp_path / "b2", ["sleep"], **pod)), opts)
    await commands.delete("c1", opts, force=True)


async def test_agent_timeouts_and_msize_come_from_the_recorded_configuration(store: StateStore,
                                                                             tmp_path: Path) -> None:
    config = tmp_path / "configuration.toml"
    text = """\
        [hypervisor.fakevmm]
        msize_9p = {msize}
        [agent.kata]
        dial_timeout_ms = 20
        reconnect_timeout_ms = {reconnect}
        request_timeout_ms = 5000
        [runtime]
        create_container_timeout = 7
        """
    config.write_text(textwrap.dedent(text.format(msize=65536, reconnect=4000)))
    opts = commands.RuntimeOptions(store, str(config), "fakevmm", 9.0)
    sandbox = await commands.create("c1", str(make_bundle(tmp_path / "b1", ["sleep"])), opts)
    # the boot's wait is the boot timeout; the pause between attempts and the call bound are configured
    assert sandbox.agent.waits == {"timeout": 9.0, "call_timeout": 5.0, "retry_interval": 0.02}
    guest = GUESTS[sandbox.id]
    assert guest.containers["c1"]["timeout"] == 7
    # the first call waits for a guest service still loading with what is left of the boot's 9 s
    assert guest.create_sandbox_timeout is not None and 5.0 < guest.create_sandbox_timeout <= 9.0
    [share] = guest.storages
    assert share.fstype == "9p" and "msize=65536" in share.options
    await sandbox.disconnect()
    # a later process reaches the agent by the values the sandbox was made with, not the file's now
    config.write_text(textwrap.dedent(text.format(msize=8192, reconnect=60000)))
    async with commands.attached("c1", opts) as attached:
        assert attached.agent.waits == {"timeout": 4.0, "call_timeout": 5.0, "retry_interval": 0.02}
    await commands.kill("c1", "9", opts)
    await commands.delete("c1", opts)


def test_parse_signal() -> None:
    assert control.parse_signal("KILL") == control.parse_signal("SIGKILL") == 9
    assert control.parse_signal("9") == 9
    assert control.parse_signal("term") == signal.SIGTERM
    for bad in ("SIGBOGUS", "0", "999", "-1"):
        with pytest.raises(KabutoError, match="invalid signal"):
            control.parse_signal(bad)


async def test_kill_reaches_a_running_run_through_its_owner(store: StateStore, tmp_path: Path) -> None:
    """While `run` holds the sandbox (and its one agent connection), `kill` asks it to signal."""
    opts = options(store)
    run = asyncio.create_task(commands.run("r1", str(make_bundle(tmp_path / "b", ["sleep"])), opts,
                                           Output().io()))
    socket_path = store.sandbox_dir("r1") / control.CONTROL_SOCKET
    await until_exists(socket_path)
    await commands.kill("r1", "TERM", opts)  # PID 1 ignores it, as under runc
    assert not run.done()
    with pytest.raises(SandboxError, match="'nobody' does not exist"):
        await control.kill_via_owner(socket_path, "nobody", signal.SIGKILL, False)
    await commands.kill("r1", "KILL", opts)
    assert await run == 128 + signal.SIGKILL


async def until_exists(path: Path) -> None:
    for _ in range(1000):
        if exists(path):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


# -- seccomp: Kata's disable_guest_seccomp ---------------------------------------------------
def with_seccomp(bundle: Path, **annotations: str) -> Path:
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}
    spec["annotations"].update(annotations)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def test_seccomp_profile_dropped_by_default(store: StateStore, tmp_path: Path) -> None:
    """CRI's RuntimeDefault profile must not stop a pod: as Kata with disable_guest_seccomp = true
    (the default), the container runs and the guest never sees the profile."""
    bundle = with_seccomp(make_bundle(tmp_path / "b", ["sleep"]))
    sandbox = await commands.create("c1", str(bundle), options(store))
    try:
        assert "seccomp" not in GUESTS["c1"].containers["c1"]["spec"]["linux"]
    finally:
        await sandbox.destroy()


async def test_seccomp_profile_refused_when_the_guest_should_enforce_it(store: StateStore,
                                                                        tmp_path: Path) -> None:
    bundle = with_seccomp(make_bundle(tmp_path / "b", ["sleep"]),
                          **{"io.katacontainers.config.runtime.disable_guest_seccomp": "false"})
    with pytest.raises(BundleError, match=r"linux\.seccomp: the guest cannot enforce"):
        await commands.create("c1", str(bundle), options(store))
    assert store.sandbox_ids() == []
    assert "c1" not in GUESTS or not GUESTS["c1"].containers


def with_namespaces(bundle: Path, **paths: str) -> Path:
    """The bundle's spec joins these namespaces by path, as CRI writes a pod member's."""
    spec = json.loads((bundle / "config.json").read_text())
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] in paths:
            namespace["path"] = paths[namespace["type"]]
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kbt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_namespace_paths_as_cri_sends_them(store: StateStore, tmp_path: Path, netns: str) -> None:
    """The pod's netns becomes the sandbox's; a member's ipc/uts/pid paths naming the sandbox task
    (the VMM's pid, which containerd was told) mean its namespaces in the guest; others are refused."""
    opts = options(store)
    sandbox = await commands.create("pod", str(with_namespaces(make_bundle(tmp_path / "p", ["sleep"]),
                                                               network=netns)), opts)
    vmm_pid = (await sandbox.hypervisor.get_pids())[0]
    await sandbox.disconnect()
    assert store.load("pod").netns == netns
    pod = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container", bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    member = with_namespaces(make_bundle(tmp_path / "app", ["sleep"], **pod), network=netns,
                             ipc=f"/proc/{vmm_pid}/ns/ipc", uts=f"/proc/{vmm_pid}/ns/uts")
    joined = await commands.create("app", str(member), opts)
    await joined.disconnect()
    namespaces = GUESTS["pod"].containers["app"]["spec"]["linux"]["namespaces"]
    assert {"type": "ipc", "path": "container:pod"} in namespaces
    assert {"type": "uts", "path": "container:pod"} in namespaces
    assert {"type": "network"} in namespaces  # the guest's own: the pod's interfaces are there
    for name, paths, reason in (
        ("stranger", {"ipc": "/proc/1/ns/ipc"}, "/proc/1/ns/ipc is not a namespace of sandbox 'pod'"),
        ("elsewhere", {"network": "/proc/1/ns/net"}, "is not the network namespace of sandbox 'pod'"),
    ):
        bad = with_namespaces(make_bundle(tmp_path / name, ["sleep"], **pod), **paths)
        with pytest.raises(BundleError, match=reason):
            await commands.create(name, str(bad), opts)
        assert name not in store.load("pod").containers
    await commands.delete("pod", opts, force=True)


@pytest.mark.parametrize("what", ["plain file", "missing", "ipc namespace"])
async def test_a_network_namespace_path_that_is_no_netns_is_refused(store: StateStore, tmp_path: Path,
                                                                   what: str) -> None:
    bogus = {"plain file": tmp_path / "not-a-netns", "missing": tmp_path / "cni-deleted-it",
             "ipc namespace": Path("/proc/self/ns/ipc")}[what]
    if what == "plain file":
        bogus.write_text("")  # as the empty mount point CNI leaves after DEL
    message = f"network namespace {bogus} does not exist" if what == "missing" else \
        f"{bogus} is not a network namespace"
    bundle = with_namespaces(make_bundle(tmp_path / "b", ["sleep"]), network=str(bogus))
    with pytest.raises(BundleError, match=message):
        await commands.create("c1", str(bundle), options(store))
    assert store.sandbox_ids() == []


# -- pod networking against a real netns (the guest and VMM are fakes) ---------------------------
@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A pod netns with eth0 (a veth, addressed, a default route) whose peer is in a second netns."""
    with netns_helpers.netns() as name, netns_helpers.netns() as peer:
        add_veth(name, peer, "eth0", "198.18.20")
        netns_helpers.sh("ip", "-n", name, "route", "add", "default", "via", "198.18.20.1")
        yield name


def add_veth(name: str, peer: str, ifname: str, prefix: str) -> None:
    sh = netns_helpers.sh
    sh("ip", "-n", peer, "link", "add", f"p-{ifname}", "type", "veth", "peer", "name", ifname, "netns", name)
    sh("ip", "-n", peer, "addr", "add", f"{prefix}.1/24", "dev", f"p-{ifname}")
    sh("ip", "-n", peer, "link", "set", f"p-{ifname}", "up")
    sh("ip", "-n", name, "addr", "add", f"{prefix}.2/24", "dev", ifname)
    sh("ip", "-n", name, "link", "set", ifname, "up")


def nics(record: Any) -> list[tuple[str, str]]:
    """(device id, tap) of each NIC the sandbox's VM has, as its record keeps them."""
    devices = record.hypervisor_state["extra"]["devices"]
    return [(d["id"], d["tap_name"]) for d in devices if d["kind"] == "network"]


def pod_links(name: str) -> list[str]:
    return sorted(link["ifname"] for link in netns_helpers.jq("ip", "-j", "-n", name, "link", "show"))


@netns_helpers.needs_netns
async def test_a_backend_without_network_devices_refuses_a_pod_interface(store: StateStore, tmp_path: Path,
                                                                        pod_netns: str) -> None:
    bundle = with_namespaces(make_bundle(tmp_path / "b", ["sleep"]), network=netns_helpers.path(pod_netns))
    with pytest.raises(SandboxError, match="eth0 cannot reach the VM: fakevmm has no network devices"):
        await commands.create("c1", str(bundle), options(store))
    assert store.sandbox_ids() == [] and pod_links(pod_netns) == ["eth0", "lo"]


@netns_helpers.needs_netns
async def test_model_none_gives_the_vm_no_nic(store: StateStore, tmp_path: Path, pod_netns: str) -> None:
    none = {"io.katacontainers.config.runtime.internetworking_model": "none"}
    bundle = with_namespaces(make_bundle(tmp_path / "b", ["sleep"], **none),
                             network=netns_helpers.path(pod_netns))
    sandbox = await commands.create("c1", str(bundle), options(store, "fakenet"))
    assert [d for d in sandbox.hypervisor.devices if d.kind == DeviceKind.NETWORK] == []
    assert store.load("c1").taps == [] and pod_links(pod_netns) == ["eth0", "lo"]
    assert GUESTS["c1"].interfaces == {}
    await sandbox.destroy()


@netns_helpers.needs_netns
async def test_a_route_the_guest_refuses_leaves_no_tap_and_no_vm(store: StateStore, tmp_path: Path,
                                                                pod_netns: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: Any, routes: list[Any]) -> list[Any]:
        raise ContainerCallError("fake", "UpdateRoutes", Code.FAILED_PRECONDITION,
                                 "routes[1]: gateway 198.18.20.1 is not reachable")

    monkeypatch.setattr(FakeContainers, "update_routes", refuse)
    bundle = with_namespaces(make_bundle(tmp_path / "b", ["sleep"]), network=netns_helpers.path(pod_netns))
    with pytest.raises(ContainerCallError, match=r"gateway 198\.18\.20\.1 is not reachable"):
        await commands.create("c1", str(bundle), options(store, "fakenet"))
    assert store.sandbox_ids() == [] and pod_links(pod_netns) == ["eth0", "lo"]
    qdiscs = netns_helpers.jq("tc", "-j", "-n", pod_netns, "qdisc", "show", "dev", "eth0")
    assert [q for q in qdiscs if q["kind"] == "ingress"] == []


@netns_helpers.needs_netns
async def test_a_later_create_plugs_a_new_interface_and_unplugs_a_vanished_one(
        store: StateStore, tmp_path: Path, pod_netns: str) -> None:
    opts, pod_path = options(store, "fakenet"), netns_helpers.path(pod_netns)
    sandbox = await commands.create("pod", str(with_namespaces(make_bundle(tmp_path / "p", ["sleep"]),
                                                               network=pod_path)), opts)
    await sandbox.disconnect()
    assert store.load("pod").taps == ["tap0_kabuto"]
    member = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container",
              bundle_module.SANDBOX_ID_ANNOTATION: "pod"}

    def joining(name: str) -> str:
        return str(with_namespaces(make_bundle(tmp_path / name, ["sleep"], **member), network=pod_path))

    with netns_helpers.netns() as peer:
        add_veth(pod_netns, peer, "eth1", "198.18.21")
        joined = await commands.create("app", joining("a"), opts)
        await joined.disconnect()
        record = store.load("pod")
        assert record.taps == ["tap0_kabuto", "tap1_kabuto"]
        assert sorted(GUESTS["pod"].interfaces) == ["eth0", "eth1"]
        assert nics(record) == [("net0", "tap0_kabuto"), ("net1", "tap1_kabuto")]
    # the peer netns went, and eth1 with it: the next create unplugs its NIC and removes its tap
    later = await commands.create("late", joining("l"), opts)
    await later.disconnect()
    record = store.load("pod")
    assert record.taps == ["tap0_kabuto"]
    assert nics(record) == [("net0", "tap0_kabuto")]
    assert pod_links(pod_netns) == ["eth0", "lo", "tap0_kabuto"]
    await commands.delete("pod", opts, force=True)
    assert pod_links(pod_netns) == ["eth0", "lo"]


@netns_helpers.needs_netns
async def test_an_interface_after_boot_is_refused_where_nics_cannot_be_hot_plugged(
        store: StateStore, tmp_path: Path, pod_netns: str) -> None:
    opts, pod_path = options(store, "fakecoldnet"), netns_helpers.path(pod_netns)
    sandbox = await commands.create("pod", str(with_namespaces(make_bundle(tmp_path / "p", ["sleep"]),
                                                               network=pod_path)), opts)
    await sandbox.disconnect()
    member = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container",
              bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    with netns_helpers.netns() as peer:
        add_veth(pod_netns, peer, "eth1", "198.18.21")
        bundle = with_namespaces(make_bundle(tmp_path / "a", ["sleep"], **member), network=pod_path)
        with pytest.raises(SandboxError, match="interface eth1 appeared after sandbox 'pod' booted, and "
                                               "fakecoldnet cannot hot-plug a NIC"):
            await commands.create("app", str(bundle), opts)
        record = store.load("pod")
        assert "app" not in record.containers and record.taps == ["tap0_kabuto"]
        assert pod_links(pod_netns) == ["eth0", "eth1", "lo", "tap0_kabuto"]
    await commands.delete("pod", opts, force=True)
    assert pod_links(pod_netns) == ["eth0", "lo"]


@netns_helpers.needs_netns
async def test_a_vanished_interface_leaves_its_nic_where_nics_cannot_be_unplugged(
        store: StateStore, tmp_path: Path, pod_netns: str, caplog: pytest.LogCaptureFixture) -> None:
    opts, pod_path = options(store, "fakecoldnet"), netns_helpers.path(pod_netns)
    member = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container",
              bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    with netns_helpers.netns() as peer:
        add_veth(pod_netns, peer, "eth1", "198.18.21")
        sandbox = await commands.create("pod", str(with_namespaces(make_bundle(tmp_path / "p", ["sleep"]),
                                                                   network=pod_path)), opts)
        await sandbox.disconnect()
    # eth1 went with its peer's netns: the create goes ahead, the NIC stays, and a warning says so
    bundle = with_namespaces(make_bundle(tmp_path / "a", ["sleep"], **member), network=pod_path)
    joined = await commands.create("app", str(bundle), opts)
    await joined.disconnect()
    assert nics(store.load("pod")) == [("net0", "tap0_kabuto"), ("net1", "tap1_kabuto")]
    assert "cannot hot-unplug a NIC: it stays until the sandbox ends" in caplog.text
    await commands.delete("pod", opts, force=True)
    assert pod_links(pod_netns) == ["eth0", "lo"]
