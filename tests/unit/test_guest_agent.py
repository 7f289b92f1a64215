"""The guest agent's parts that run anywhere: port and vsock device lookup, the virtio-serial
session loop (on a pty, whose hang-up behaves like a virtio-serial port's), reaping, start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import socket
import struct
import subprocess
import sys
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kabuto.errors import KabutoError
from kabuto.guest import channel, service
from kabuto.guest.__main__ import describe, parse_args
from kabuto.guest.service import AgentService, count_cpu_list
from kabuto.hypervisor.devices import AGENT_VSOCK_PORT
from kabuto.protos import AGENT_SERVICE, agent_pb2
from kabuto.ttrpc import Client, Server


@pytest.mark.parametrize(("text", "count"), [("0\n", 1), ("0-3\n", 4), ("0-1,4,6-7\n", 5), ("", 0)])
def test_count_cpu_list(text: str, count: int) -> None:
    assert count_cpu_list(text) == count


def test_init_handover_is_read_from_kernel_log_records(tmp_path: Path) -> None:
    # A FIFO stands in for /dev/kmsg: one record per read, then no more (EAGAIN).
    kmsg = tmp_path / "kmsg"
    os.mkfifo(kmsg)
    writer = os.open(kmsg, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(writer, b"6,100,1500000,-;Freeing unused kernel image memory: 2048K\n")
        assert service.read_init_handover_uptime(kmsg) == 0.0  # the record is not there
        os.write(writer, b"6,101,2345678,-;Run /init as init process\n")
        assert service.read_init_handover_uptime(kmsg) == pytest.approx(2.345678)
    finally:
        os.close(writer)


def test_process_start_is_read_from_proc() -> None:
    assert 0 < service.read_process_start_uptime() <= service.read_uptime()


def fake_ports(root: Path, names: dict[str, str]) -> tuple[Path, Path]:
    dev, sys_root = root / "dev", root / "sys"
    for port, name in names.items():
        (sys_root / "class/virtio-ports" / port).mkdir(parents=True)
        (sys_root / "class/virtio-ports" / port / "name").write_text(name + "\n")
        (sys_root / "class/virtio-ports" / port / "dev").write_text("1:3\n")  # /dev/null's numbers
    dev.mkdir()
    return dev, sys_root


def test_find_port_by_name_in_sysfs(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(
        tmp_path, {"vport0p1": "org.qemu.guest_agent.0", "vport0p2": "agent.channel.0"}
    )
    (dev / "vport0p1").touch()
    (dev / "vport0p2").touch()
    assert channel.find_port("agent.channel.0", dev, sys_root) == dev / "vport0p2"
    assert channel.find_port("absent", dev, sys_root) is None


def test_find_port_prefers_the_udev_link(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(tmp_path, {"vport0p2": "agent.channel.0"})
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports/agent.channel.0").touch()
    assert channel.find_port("agent.channel.0", dev, sys_root) == dev / "virtio-ports/agent.channel.0"


def test_find_ports_lists_every_agent_port(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(tmp_path, {"vport0p1": "org.qemu.guest_agent.0", "vport0p2": "agent.channel.0",
                                          "vport0p3": "agent.channel.1", "vport0p4": "agent.channel.2"})
    for node in ("vport0p1", "vport0p2", "vport0p3", "vport0p4"):
        (dev / node).touch()
    assert channel.find_ports(channel.PORT_NAME_PREFIX, dev, sys_root) == {
        "agent.channel.0": dev / "vport0p2", "agent.channel.1": dev / "vport0p3",
        "agent.channel.2": dev / "vport0p4"}


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_find_port_creates_a_missing_device_node(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(tmp_path, {"vport1p1": "agent.channel.0"})
    node = channel.find_port("agent.channel.0", dev, sys_root)
    assert node == dev / "vport1p1"
    assert os.major(node.stat().st_rdev) == 1 and os.minor(node.stat().st_rdev) == 3


def fake_vsock(sys_root: Path, *devices: str) -> None:
    """The vsock virtio driver's sysfs directory as Linux shows it, with ``devices`` bound."""
    driver = sys_root / "bus/virtio/drivers" / channel.VSOCK_DRIVER
    driver.mkdir(parents=True)
    for name in ("bind", "unbind", "uevent"):
        (driver / name).touch()
    for device in devices:
        (driver / device).symlink_to(f"../../../../devices/pci0000:00/0000:00:04.0/{device}")


def test_vsock_devices_are_the_ones_bound_to_the_vsock_driver(tmp_path: Path) -> None:
    assert channel.vsock_devices(tmp_path) is None
    fake_vsock(tmp_path)
    assert channel.vsock_devices(tmp_path) == []
    (tmp_path / "bus/virtio/drivers" / channel.VSOCK_DRIVER / "virtio3").symlink_to("../x/virtio3")
    assert channel.vsock_devices(tmp_path) == ["virtio3"]


@pytest.mark.parametrize(
    ("mode", "devices", "serves"),
    [("auto", ("virtio3",), True), ("auto", (), False), ("on", (), True), ("off", ("virtio3",), False)],
)
def test_vsock_is_served_as_the_mode_and_the_devices_say(
    tmp_path: Path, mode: str, devices: tuple[str, ...], serves: bool
) -> None:
    fake_vsock(tmp_path, *devices)
    assert channel.serves_vsock(mode, tmp_path) is serves


async def test_a_vm_with_a_vsock_device_and_no_port_has_a_channel(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(tmp_path, {})
    fake_vsock(sys_root, "virtio0")
    found = await channel.wait_for_channels("agent.channel.0", "auto", 0.1, dev, sys_root)
    assert found == channel.Channels({}, vsock=True)


async def test_a_vm_with_both_channels_serves_both(tmp_path: Path) -> None:
    dev, sys_root = fake_ports(tmp_path, {"vport0p1": "agent.channel.0"})
    (dev / "vport0p1").touch()
    fake_vsock(sys_root, "virtio0")
    found = await channel.wait_for_channels("agent.channel.0", "auto", 0.1, dev, sys_root)
    assert found == channel.Channels({"agent.channel.0": dev / "vport0p1"}, vsock=True)


@pytest.mark.parametrize(
    ("mode", "driver", "why"),
    [
        ("auto", False, "no vsock transport (no vmw_vsock_virtio_transport driver in this kernel)"),
        ("auto", True, "no vsock device (none bound to vmw_vsock_virtio_transport)"),
        ("off", True, "vsock is off"),
    ],
)
async def test_waiting_for_a_vm_without_any_channel_is_bounded(
    tmp_path: Path, mode: str, driver: bool, why: str
) -> None:
    dev, sys_root = fake_ports(tmp_path, {})
    if driver:
        fake_vsock(sys_root)
    with pytest.raises(channel.ChannelError) as failed:
        await channel.wait_for_channels("no-such-port", mode, 0.1, dev, sys_root)
    assert str(failed.value) == f"no agent channel within 0.1s: no virtio-serial port named 'no-such-port' " \
                                f"appeared and {why}"


def test_the_guest_serves_vsock_on_the_port_the_host_dials() -> None:
    assert channel.DEFAULT_VSOCK_PORT == AGENT_VSOCK_PORT
    args = parse_args([])
    assert (args.vsock, args.vsock_port) == ("auto", AGENT_VSOCK_PORT)
    assert parse_args(["--vsock", "on", "--vsock-port", "2048"]).vsock_port == 2048


def test_a_task_groups_errors_are_reported_by_what_they_are() -> None:
    group = BaseExceptionGroup("unhandled errors in a TaskGroup", [channel.ChannelError("cannot listen")])
    assert describe(group) == "ChannelError: cannot listen"


# -- the session loop on a pty -------------------------------------------------------------


@contextlib.asynccontextmanager
async def agent_on_ptys(count: int) -> AsyncIterator[list[str]]:
    """The agent serving ``count`` pty masters with one set of services, as it serves each
    agent.channel.N port; yields the slaves' paths, where "the host" connects.

    Like a virtio-serial port, a master reports a hang-up while no slave is open, and
    the agent keeps it open across host connections.
    """
    server = Server()
    server.register(AGENT_SERVICE, AgentService(started_uptime=0.0).methods())
    ports: list[channel.VirtioSerialChannel] = []
    slave_paths: list[str] = []
    for index in range(count):
        master, slave = pty.openpty()
        slave_paths.append(os.ttyname(slave))
        tty.setraw(slave)  # binary-clean; the setting outlives this first opening
        os.close(slave)  # no host connected yet
        os.set_blocking(master, False)
        ports.append(channel.VirtioSerialChannel(master, f"pty{index}"))
    serving = [asyncio.create_task(port.serve_forever(server.serve)) for port in ports]
    try:
        yield slave_paths
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        for port in ports:
            port.close()


@contextlib.asynccontextmanager
async def agent_on_pty() -> AsyncIterator[str]:
    async with agent_on_ptys(1) as (slave_path,):
        yield slave_path


@contextlib.asynccontextmanager
async def host_connection(slave_path: str) -> AsyncIterator[Client]:
    """A host connection, as a new CLI process makes one through QEMU's socket; leaving
    the block closes every fd of it, which the agent sees as the host hanging up."""
    loop = asyncio.get_running_loop()
    fd = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0)
    )
    # A StreamReaderProtocol gives the writer its flow control; its own reader stays unused.
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(os.dup(fd), "wb", 0)
    )
    client = Client(reader, asyncio.StreamWriter(transport, protocol, reader, loop), name="agent on pty")
    try:
        yield client
    finally:
        await client.close()
        read_transport.close()
        await asyncio.sleep(0)  # let the transports close their fds


async def check(client: Client, timeout: float = 5) -> int:
    answer = await client.call(
        AGENT_SERVICE, "Check", agent_pb2.CheckRequest(), agent_pb2.CheckResponse, timeout=timeout
    )
    return answer.status


class SessionEnds(logging.Handler):
    """Counts the agent's "host disconnected" log lines, so a test can wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "host disconnected" in record.getMessage():
            self.count += 1
            self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def session_ends() -> Iterator[SessionEnds]:
    handler = SessionEnds()
    logger = logging.getLogger("kabuto.guest.channel")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.setLevel(previous_level)
    logger.removeHandler(handler)


async def test_agent_serves_each_host_connection_in_turn(session_ends: SessionEnds) -> None:
    async with agent_on_pty() as slave_path:
        for session in range(1, 4):
            async with host_connection(slave_path) as client:
                assert await check(client) == agent_pb2.CheckResponse.SERVING
                details = await client.call(
                    AGENT_SERVICE,
                    "GetGuestDetails",
                    agent_pb2.GuestDetailsRequest(),
                    agent_pb2.GuestDetailsResponse,
                    timeout=5,
                )
                assert details.kernel_release == os.uname().release
            await session_ends.wait_for(session)


async def test_every_port_serves_its_own_host_at_the_same_time(session_ends: SessionEnds) -> None:
    async with agent_on_ptys(3) as slave_paths, contextlib.AsyncExitStack() as hosts:
        clients = [await hosts.enter_async_context(host_connection(path)) for path in slave_paths]
        statuses = await asyncio.gather(*(check(client) for client in clients))
        assert statuses == [agent_pb2.CheckResponse.SERVING] * 3
        # one host leaving its port disturbs neither the others nor a new host on that port
        await hosts.aclose()
        await session_ends.wait_for(3)
        async with host_connection(slave_paths[1]) as again, host_connection(slave_paths[2]) as other:
            assert await check(again) == await check(other) == agent_pb2.CheckResponse.SERVING


async def test_a_host_reconnecting_at_once_is_served_too() -> None:
    # The agent may not see the hang-up in between; the restarted stream ids tell it.
    async with agent_on_pty() as slave_path:
        for _ in range(3):
            async with host_connection(slave_path) as client:
                assert await check(client) == agent_pb2.CheckResponse.SERVING


async def test_after_garbage_the_agent_waits_for_the_host_to_leave_then_starts_clean(
    session_ends: SessionEnds,
) -> None:
    async with agent_on_pty() as slave_path:
        async with host_connection(slave_path) as client:
            # A 4 GiB header: the agent drops the session and ignores this host from now on.
            client._writer.write(struct.pack(">IIBB", 0xFFFFFFFF, 1, 1, 0))
            with pytest.raises(KabutoError, match="DEADLINE_EXCEEDED"):
                await check(client, timeout=0.3)
        await session_ends.wait_for(1)
        async with host_connection(slave_path) as client:
            assert await check(client) == agent_pb2.CheckResponse.SERVING


# -- reaping and start-up ------------------------------------------------------------------

REAPER_SCRIPT = """
import asyncio, os, subprocess
from kabuto.guest.init import Reaper

async def main():
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    exits = subprocess.Popen(["sh", "-c", "exit 7"])
    exited = reaper.watch(exits.pid)
    killed = subprocess.Popen(["sh", "-c", "kill -TERM $$"])
    was_killed = reaper.watch(killed.pid)
    unwatched = subprocess.Popen(["true"])
    print(await asyncio.wait_for(exited, 10), await asyncio.wait_for(was_killed, 10))
    for _ in range(100):  # the unwatched child is reaped too: no zombie remains
        if not os.path.exists(f"/proc/{unwatched.pid}"):
            break
        await asyncio.sleep(0.05)
    print(os.path.exists(f"/proc/{unwatched.pid}"))

asyncio.run(main())
"""


def test_reaper_collects_every_child_and_reports_watched_exits() -> None:
    result = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7", "-15", "False"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "tcp://0.0.0.0:1"], "unsupported listen address 'tcp://0.0.0.0:1'"),
        (["--listen", "vsock://port"], "bad vsock address"),
        # off: a host that is itself a VM may have a vsock device the agent would serve
        (
            ["--port-name", "no-such-port", "--port-timeout", "0.1", "--vsock", "off"],
            "no agent channel within 0.1s: no virtio-serial port named 'no-such-port' appeared and vsock "
            "is off",
        ),
    ],
)
def test_agent_start_up_failures_are_reported(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kabuto.guest", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert message in result.stderr


@pytest.mark.parametrize("port", ["0", "4294967295", "port"])
def test_a_bad_vsock_port_is_refused_before_anything_starts(port: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kabuto.guest", "--vsock-port", port], capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 2
    assert f"invalid vsock_port value: '{port}'" in result.stderr


async def test_online_cpus_brings_hot_added_cpus_online_and_waits_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sysfs of two CPUs, cpu1 hot-added and offline: the agent writes its online file (the
    kernel's online list, standing in, counts cpu0 and every cpuN whose file says 1). Asking for
    more than exist ends at the (short) timeout with what is online."""
    cpus = tmp_path / "devices/system/cpu"
    (cpus / "cpu1").mkdir(parents=True)
    (cpus / "cpu1" / "online").write_text("0\n")

    def kernel_list(sys_root: Path) -> int:
        return 1 + sum(f.read_text().strip() == "1" for f in cpus.glob("cpu[0-9]*/online"))

    monkeypatch.setattr(service, "read_online_cpus", kernel_list)
    monkeypatch.setattr(service, "ONLINE_POLL", 0.01)
    assert await service.online_cpus(2, 5.0, sys_root=tmp_path) == 2
    assert (cpus / "cpu1" / "online").read_text() == "1"
    assert await service.online_cpus(3, 0.05, sys_root=tmp_path) == 2


def test_a_vsock_port_already_in_use_ends_the_agent_naming_it() -> None:
    """The serving path of the shipped agent (vsock on, no --listen) on this host's AF_VSOCK: a
    port something else holds is a fatal error naming the port (as PID 1 it powers off)."""
    try:
        holder = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"this host kernel has no AF_VSOCK: {exc}")
    with holder:
        holder.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kabuto.guest", "--vsock", "on", "--vsock-port", str(port),
             "--port-name", "no-such-port", "--port-timeout", "5"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert result.returncode == 1
    message = f"ChannelError: cannot listen on vsock port {port}: [Errno 98] Address already in use"
    assert message in result.stderr, result.stderr
