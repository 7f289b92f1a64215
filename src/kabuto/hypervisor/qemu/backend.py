"""QemuHypervisor: one QEMU process per VM, driven through QMP (qemu.qmp's async QMPClient)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, BinaryIO, Self

import psutil
from qemu.qmp import EventListener, QMPClient, QMPError

from kabuto.agent.client import PORT_LOCK_SUFFIX
from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.base import (
    DEFAULT_JAILER_ROOT,
    Hypervisor,
    HypervisorState,
    VcpuThreadIds,
    VmStatus,
)
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    VfioDevice,
)
from kabuto.hypervisor.host import Accelerator, choose_accelerator
from kabuto.hypervisor.qemu.cmdline import (
    VmPaths,
    block_device_args,
    blockdev_args,
    build_command,
    hotplug_bus,
    net_device_args,
    netdev_args,
    root_port_count,
    use_vhost_net,
)
from kabuto.hypervisor.qemu.plugin import CAPABILITIES

log = logging.getLogger(__name__)

AGENT_PORT_NAME = "agent.channel.0"
AGENT_DEVICE_ID = "agent"
# A virtio-serial port takes one host connection at a time: this many ports let as many host
# processes (a streaming `run`, an `exec`, a `state`...) talk to the agent at once.
AGENT_PORT_COUNT = 4
DEV_VHOST_VSOCK = Path("/dev/vhost-vsock")
DEV_VHOST_NET = Path("/dev/vhost-net")
VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# sun_path holds 108 bytes including the terminating NUL
UNIX_PATH_MAX = 107

# Bounds on every wait (seconds).
QMP_COMMAND_TIMEOUT = 10.0
QMP_RECONNECT_TIMEOUT = 5.0
STOP_GRACE_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
DEVICE_RELEASE_TIMEOUT = 10.0
MIGRATION_TIMEOUT = 120.0
POLL_INTERVAL = 0.02

# The guest writes the console: keep a bounded tail in memory and a bounded log on disk.
CONSOLE_TAIL_BYTES = 64 * 1024
CONSOLE_LOG_MAX_BYTES = 1024 * 1024
ERROR_TAIL_CHARS = 1500


class QemuHypervisor(Hypervisor):
    name = "qemu"
    capabilities = CAPABILITIES

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT) -> None:
        super().__init__(config, jailer_root)
        self.accelerator: Accelerator | None = None
        #: phase -> seconds since spawn, filled by start_vm ("qmp_ready", "guest_port_open", ...)
        self._process: asyncio.subprocess.Process | None = None
        self._pid = 0
        self._pid_create_time = 0.0
        self._qmp: QMPClient | None = None
        self._console: _ConsoleReader | None = None
        self._agent: AgentChannel | None = None
        #: the virtio-serial agent ports after the primary one (none for vsock)
        self._extra_agent_ports: list[AgentChannel] = []
        self._hotplug_slots: dict[str, str] = {}
        self._vhost_net = False

    @property
    def paths(self) -> VmPaths:
        return VmPaths(self.vm_path)

    # -- lifecycle ----------------------------------------------------------------------------
    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self._require(VmStatus.NEW, operation="prepare the VM")
        if not VM_ID.fullmatch(id):
            raise self._error(f"VM id {id!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        self.id = id
        agent_lock = Path(f"{self.paths.agent_port_socket(AGENT_PORT_COUNT - 1)}{PORT_LOCK_SUFFIX}")
        longest = max((self.paths.qmp_socket, self.paths.console_socket, agent_lock),
                      key=lambda p: len(str(p)))
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            raise self._error(f"socket path {longest} is longer than {UNIX_PATH_MAX} bytes; "
                              "use a shorter jailer root or VM id")
        self.jailer_root.mkdir(parents=True, exist_ok=True)
        try:
            self.vm_path.mkdir(mode=0o750)
        except FileExistsError:
            raise self._error(f"VM directory {self.vm_path} already exists (is VM {id!r} running?)") from None
        self.netns = netns
        if _vsock_available():
            # A CID is host-global; a random one from the 32-bit space makes collisions negligible.
            agent = AgentChannel(AGENT_DEVICE_ID, ChannelKind.VSOCK, guest_cid=3 + secrets.randbelow(2**31))
        else:
            agent = AgentChannel(AGENT_DEVICE_ID, ChannelKind.VIRTIO_SERIAL,
                                 socket_path=self.paths.agent_socket, name=AGENT_PORT_NAME)
            self._extra_agent_ports = [
                AgentChannel(f"{AGENT_DEVICE_ID}{index}", ChannelKind.VIRTIO_SERIAL,
                             socket_path=self.paths.agent_port_socket(index), name=f"agent.channel.{index}")
                for index in range(1, AGENT_PORT_COUNT)
            ]
        self._agent = agent
        self.pending_devices.extend([agent, *self._extra_agent_ports])
        self.status = VmStatus.PREPARED

    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        """Boot (or, with ``restore_from``, resume a VM saved by ``save_vm``) within ``timeout``.

        A fresh boot returns once the guest opened the agent's virtio-serial port (the agent is
        listening); a failure kills QEMU, removes everything and says why.
        """
        self._require(VmStatus.PREPARED, operation="start the VM")
        if restore_from is not None and not _is_file(restore_from):
            raise self._error(f"saved VM state {restore_from} does not exist")
        self.accelerator = choose_accelerator(self.config.accel)
        self._vhost_net = use_vhost_net(self.config, self.accelerator, _exists(DEV_VHOST_NET))
        command = build_command(self.config, self.accelerator, self.paths, self.pending_devices, self.id,
                                incoming=restore_from is not None, vhost_net=self._vhost_net)
        if self.netns:
            command = ["nsenter", f"--net={_netns_path(self.netns)}", *command]
        log.debug("qemu command: %s", command)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._spawn(command)
                self.boot_timings["vmm_spawned"] = time.monotonic() - started
                await self._connect_qmp(wait_for_socket=True)
                self.boot_timings["qmp_ready"] = time.monotonic() - started
                self._console = _ConsoleReader(self.paths.console_socket, self.paths.console_log)
                await self._console.start()
                if restore_from is not None:
                    await self._incoming_migration(Path(restore_from))
                    await self._qmp_call("cont")
                else:
                    await self._boot_until_agent_port_opens(started)
        except TimeoutError:
            reason = self._failure_tail()
            await self.cleanup()
            raise VmTimeout(f"qemu: VM {self.id} did not boot within {timeout:g}s{reason}") from None
        except BaseException as exc:
            reason = self._failure_tail()
            await self.cleanup()
            if isinstance(exc, HypervisorError):
                raise type(exc)(f"{exc}{reason}") from exc
            raise
        self.devices.extend(self.pending_devices)
        self.pending_devices.clear()
        self.status = VmStatus.RUNNING

    async def _spawn(self, command: list[str]) -> None:
        with _open_log(self.paths.qemu_log, "wb") as stderr:
            try:
                # A session of its own: Ctrl-C in the terminal reaches us, not QEMU, and the VM
                # outlives this process when the state is saved for a later one (save_state).
                self._process = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=stderr, start_new_session=True,
                )
            except OSError as exc:
                raise self._error(f"cannot run {command[0]}: {exc.strerror}") from None
        self._pid = self._process.pid
        with contextlib.suppress(psutil.Error):
            self._pid_create_time = psutil.Process(self._pid).create_time()

    async def _boot_until_agent_port_opens(self, started: float) -> None:
        if self._agent is None or self._agent.channel != ChannelKind.VIRTIO_SERIAL:
            await self._qmp_call("cont")
            return
        agent_id = self._agent.id
        listener = EventListener("VSERPORT_CHANGE",
                                 lambda e: e["data"].get("id") == agent_id and e["data"].get("open") is True)
        assert self._qmp is not None
        with self._qmp.listen(listener):
            await self._qmp_call("cont")
            self.boot_timings["guest_started"] = time.monotonic() - started
            await self._until_exit_or(listener.get(), "before the guest agent opened its port")
        self.boot_timings["guest_port_open"] = time.monotonic() - started

    async def _until_exit_or(self, awaitable: Any, what: str) -> Any:
        """Await ``awaitable`` unless QEMU exits first (then raise with the reason)."""
        task = asyncio.ensure_future(awaitable)
        exited = asyncio.ensure_future(self._wait_exit())
        try:
            done, _ = await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, exited):
                pending.cancel()
            await asyncio.gather(task, exited, return_exceptions=True)
        if task in done and not task.cancelled():
            return task.result()
        status = self._process.returncode if self._process is not None else None
        raise self._error(f"QEMU exited{'' if status is None else f' (status {status})'} {what}")

    async def _wait_exit(self) -> None:
        if self._process is not None:
            await self._process.wait()
            return
        # not our child (restored from saved state): poll, the caller bounds the wait
        while True:
            if not _alive(self._pid, self._pid_create_time):
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def stop_vm(self) -> None:
        if self.status in (VmStatus.NEW, VmStatus.PREPARED, VmStatus.STOPPED):
            return
        # `quit` lets QEMU flush its block devices; the guest itself is disposable.
        with contextlib.suppress(HypervisorError, QMPError, OSError):
            if self._qmp is None:
                # dropped by disconnect() so that other processes could use QMP meanwhile
                await self._connect_qmp(wait_for_socket=False)
            await self._qmp_call("quit", timeout=STOP_GRACE_TIMEOUT)
        try:
            async with asyncio.timeout(STOP_GRACE_TIMEOUT):
                await self._wait_exit()
        except TimeoutError:
            log.warning("qemu: VM %s did not quit within %gs, killing it", self.id, STOP_GRACE_TIMEOUT)
        await self._kill()
        await self.disconnect()
        self.status = VmStatus.STOPPED

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._qmp_call("stop")
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._qmp_call("cont")
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        """Pause the VM and migrate its state into ``<vm dir>/vm.state``; the VM stays paused."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="save")
        if self.status == VmStatus.RUNNING:
            await self.pause_vm()
        target = self.paths.saved_state
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # An fd passed over QMP: no shell (`exec:`) and it works under -sandbox spawn=deny.
            await self._pass_fd(fd, "migration-out")
            await self._qmp_call("migrate", {"uri": "fd:migration-out"})
        finally:
            os.close(fd)
        await self._wait_migration("query-migrate", done=lambda r: r.get("status") == "completed",
                                   failed=lambda r: r.get("status") in ("failed", "cancelled"))
        return target

    async def _incoming_migration(self, source: Path) -> None:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._pass_fd(fd, "migration-in")
            await self._qmp_call("migrate-incoming", {"uri": "fd:migration-in"})
        finally:
            os.close(fd)
        await self._until_exit_or(
            self._wait_migration("query-status", done=lambda r: r.get("status") != "inmigrate",
                                 failed=lambda r: False),
            f"while loading the saved state {source}",
        )

    async def _pass_fd(self, fd: int, name: str) -> None:
        assert self._qmp is not None
        self._qmp.send_fd_scm(fd)
        await self._qmp_call("getfd", {"fdname": name})

    async def _wait_migration(self, query: str, done: Any, failed: Any) -> None:
        try:
            async with asyncio.timeout(MIGRATION_TIMEOUT):
                while True:
                    reply = await self._qmp_call(query)
                    if failed(reply):
                        raise self._error(f"migration failed: {reply.get('error-desc', reply)}")
                    if done(reply):
                        return
                    await asyncio.sleep(POLL_INTERVAL * 5)
        except TimeoutError:
            raise VmTimeout(f"qemu: migration of VM {self.id} did not finish within {MIGRATION_TIMEOUT:g}s") \
                from None

    # -- devices ------------------------------------------------------------------------------
    async def _hotplug_add(self, device: AnyDevice) -> None:
        if isinstance(device, BlockDevice):
            driver = self.config.block_device_driver or "virtio-blk"
            bus = self._take_slot(device.id) if driver == "virtio-blk" else None
            try:
                await self._qmp_call("blockdev-add", blockdev_args(device))
                try:
                    await self._qmp_call("device_add", block_device_args(device, driver, bus))
                except BaseException:
                    await self._qmp_call("blockdev-del", {"node-name": f"drive-{device.id}"})
                    raise
            except BaseException:
                self._hotplug_slots.pop(device.id, None)
                raise
            device.guest_address = f"serial:{block_device_args(device, driver, None)['serial']}"
        elif isinstance(device, NetworkDevice):
            bus = self._take_slot(device.id)
            try:
                await self._qmp_call("netdev_add", netdev_args(device, vhost=self._vhost_net))
                try:
                    await self._qmp_call("device_add", net_device_args(device, bus))
                except BaseException:
                    await self._qmp_call("netdev_del", {"id": f"net-{device.id}"})
                    raise
            except BaseException:
                self._hotplug_slots.pop(device.id, None)
                raise
        else:
            raise self._unsupported(f"hot-plugging a {device.kind.value} device")

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        if not isinstance(device, BlockDevice | NetworkDevice):
            raise self._unsupported(f"hot-unplugging a {device.kind.value} device")
        assert self._qmp is not None
        listener = EventListener("DEVICE_DELETED", lambda e: e["data"].get("device") == device.id)
        with self._qmp.listen(listener):
            await self._qmp_call("device_del", {"id": device.id})
            try:
                async with asyncio.timeout(DEVICE_RELEASE_TIMEOUT):
                    await listener.get()
            except TimeoutError:
                raise VmTimeout(f"qemu: the guest did not release device {device.id} within "
                                f"{DEVICE_RELEASE_TIMEOUT:g}s") from None
        if isinstance(device, BlockDevice):
            await self._qmp_call("blockdev-del", {"node-name": f"drive-{device.id}"})
        else:
            await self._qmp_call("netdev_del", {"id": f"net-{device.id}"})
        self._hotplug_slots.pop(device.id, None)

    def _take_slot(self, device_id: str) -> str | None:
        """A free hot-plug bus for a PCI device: a root port on q35, the root bus on pc."""
        if self.config.machine_type != "q35":
            return hotplug_bus(self.config.machine_type, 0)
        used = set(self._hotplug_slots.values())
        for index in range(root_port_count(self.config)):
            bus = hotplug_bus("q35", index)
            if bus not in used:
                self._hotplug_slots[device_id] = bus
                return bus
        raise self._error(f"no free hot-plug slot for {device_id}: all {root_port_count(self.config)} "
                          "PCIe root ports are in use (raise pcie_root_port)")

    # -- queries ------------------------------------------------------------------------------
    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the VM (diagnostics, tests), bounded like every other call."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation=f"run QMP {command}")
        return await self._qmp_call(command, arguments)

    async def get_agent_socket(self) -> str:
        if self._agent is None:
            raise self._error("no agent channel: call prepare_vm first")
        if self._agent.channel == ChannelKind.VSOCK:
            return f"vsock://{self._agent.guest_cid}:{self._agent.port}"
        return f"unix://{self._agent.socket_path}"

    async def get_agent_sockets(self) -> list[str]:
        extra = [f"unix://{port.socket_path}" for port in self._extra_agent_ports]
        return [await self.get_agent_socket(), *extra]

    async def get_thread_ids(self) -> VcpuThreadIds:
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="list vCPU threads")
        cpus = await self._qmp_call("query-cpus-fast")
        return VcpuThreadIds({int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in cpus})

    async def get_pids(self) -> list[int]:
        return [self._pid] if self._pid and _alive(self._pid, self._pid_create_time) else []

    # -- teardown -----------------------------------------------------------------------------
    async def disconnect(self) -> None:
        if self._console is not None:
            await self._console.stop()
            self._console = None
        if self._qmp is not None:
            # disconnect() re-raises whatever ended the session (EOFError when QEMU died)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(QMP_COMMAND_TIMEOUT):
                    await self._qmp.disconnect()
            self._qmp = None

    async def cleanup(self) -> None:
        await self._kill()
        await self.disconnect()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        self.status = VmStatus.STOPPED

    async def _kill(self) -> None:
        if self._pid and _alive(self._pid, self._pid_create_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(KILL_TIMEOUT):
                    await self._wait_exit()
            except TimeoutError:
                log.error("qemu: pid %d survived SIGKILL for %gs", self._pid, KILL_TIMEOUT)
        elif self._process is not None and self._process.returncode is None:
            # reap a child that already exited on its own
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_TIMEOUT):
                    await self._process.wait()

    # -- state for another process ------------------------------------------------------------
    async def save_state(self) -> HypervisorState:
        return await self._state(
            await self.get_agent_socket() if self._agent else "",
            {
                "pid_create_time": self._pid_create_time,
                "qmp_socket": str(self.paths.qmp_socket),
                "accelerator": self.accelerator.name if self.accelerator else "",
                "hotplug_slots": dict(self._hotplug_slots),
                "vhost_net": self._vhost_net,
                "devices": [_device_to_dict(d) for d in self.devices],
                "agent": _device_to_dict(self._agent) if self._agent else None,
                "extra_agent_ports": [_device_to_dict(port) for port in self._extra_agent_ports],
            },
        )

    @classmethod
    async def restore(
        cls, config: HypervisorConfig, state: HypervisorState, jailer_root: Path = DEFAULT_JAILER_ROOT
    ) -> Self:
        """Reconnect to a VM started by another process; a VM that is gone comes back STOPPED."""
        if state.hypervisor_name != cls.name:
            raise HypervisorError(f"qemu: cannot restore a {state.hypervisor_name!r} VM")
        self = cls(config, Path(state.jailer_root or jailer_root))
        self.id = state.id
        if Path(state.vm_path) != self.vm_path:
            raise self._error(f"saved VM path {state.vm_path} does not match {self.vm_path}")
        extra = state.extra
        self._pid = state.pids[0] if state.pids else 0
        self._pid_create_time = float(extra.get("pid_create_time", 0.0))
        self._hotplug_slots = dict(extra.get("hotplug_slots", {}))
        self._vhost_net = bool(extra.get("vhost_net", False))
        self.devices = [_device_from_dict(d) for d in extra.get("devices", [])]
        agent = _device_from_dict(extra["agent"]) if extra.get("agent") else None
        self._agent = agent if isinstance(agent, AgentChannel) else None
        self._extra_agent_ports = [port for port in map(_device_from_dict, extra.get("extra_agent_ports", []))
                                   if isinstance(port, AgentChannel)]
        if not self._pid or not _alive(self._pid, self._pid_create_time):
            self.status = VmStatus.STOPPED
            return self
        await self._connect_qmp(wait_for_socket=False)
        running = (await self._qmp_call("query-status")).get("running")
        self.status = VmStatus.RUNNING if running else VmStatus.PAUSED
        return self

    # -- QMP ----------------------------------------------------------------------------------
    async def _connect_qmp(self, wait_for_socket: bool) -> None:
        """Connect to QEMU's QMP socket; while booting, poll until QEMU has created it."""
        client = QMPClient(f"kabuto-{self.id}")
        socket_path = str(self.paths.qmp_socket)
        try:
            async with asyncio.timeout(None if wait_for_socket else QMP_RECONNECT_TIMEOUT):
                while True:
                    if self._process is not None and self._process.returncode is not None:
                        status = self._process.returncode
                        raise self._error(f"QEMU exited with status {status} during start-up")
                    # only try once QEMU created the socket: qemu.qmp logs every failed connect
                    if not wait_for_socket or _exists(socket_path):
                        try:
                            await client.connect(socket_path)
                            break
                        except (QMPError, OSError):
                            if not wait_for_socket:
                                raise
                    await asyncio.sleep(POLL_INTERVAL)
        except (QMPError, OSError, TimeoutError) as exc:
            raise self._error(f"cannot connect to QMP at {socket_path}: {exc}") from None
        self._qmp = client

    async def _qmp_call(self, command: str, arguments: dict[str, Any] | None = None,
                        timeout: float = QMP_COMMAND_TIMEOUT) -> Any:
        if self._qmp is None:
            raise self._error(f"{command}: not connected to QMP")
        try:
            async with asyncio.timeout(timeout):
                return await self._qmp.execute(command, arguments)
        except TimeoutError:
            raise VmTimeout(f"qemu: QMP {command} got no answer within {timeout:g}s") from None
        except QMPError as exc:
            raise self._error(f"QMP {command} failed: {exc}") from None

    def _failure_tail(self) -> str:
        """The end of QEMU's stderr and the guest console, for an error message."""
        parts = []
        with contextlib.suppress(OSError):
            stderr = self.paths.qemu_log.read_bytes()[-ERROR_TAIL_CHARS:].decode(errors="replace").strip()
            if stderr:
                parts.append(f"QEMU stderr: {stderr}")
        if self._console is not None:
            console = _printable(self._console.tail()[-ERROR_TAIL_CHARS:]).strip()
            if console:
                parts.append(f"guest console (last lines):\n{console}")
        return "".join(f"\n{p}" for p in parts)


class _ConsoleReader:
    """Reads the guest serial console: a bounded tail in memory, a bounded log file on disk."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._tail = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(self.socket_path))
        self._task = asyncio.create_task(self._pump(reader))

    def tail(self) -> bytes:
        return bytes(self._tail)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        written = 0
        with _open_log(self.log_path, "ab") as log_file:
            while chunk := await reader.read(4096):
                self._tail += chunk
                del self._tail[:-CONSOLE_TAIL_BYTES]
                if written < CONSOLE_LOG_MAX_BYTES:
                    piece = chunk[: CONSOLE_LOG_MAX_BYTES - written]
                    log_file.write(piece)
                    log_file.flush()
                    written += len(piece)
                    if written >= CONSOLE_LOG_MAX_BYTES:
                        log_file.write(b"\n[kabuto: console log truncated]\n")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()


def _alive(pid: int, create_time: float) -> bool:
    """True while ``pid`` is the same live (non-zombie) process we started."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if create_time and abs(process.create_time() - create_time) > 0.01:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _vsock_available() -> bool:
    return DEV_VHOST_VSOCK.exists()


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


def _is_file(path: str | Path) -> bool:
    return Path(path).is_file()


def _open_log(path: Path, mode: str) -> BinaryIO:
    # Small local writes; not worth a thread hop.
    return open(path, mode)


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/var/run/netns/{netns}"


def _printable(data: bytes) -> str:
    text = data.decode(errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text.replace("\r", ""))


_DEVICE_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (BlockDevice, NetworkDevice, AgentChannel, SharedFsDevice, VfioDevice)
}
_FIELD_TYPES = {"path": Path, "socket_path": Path, "host_path": Path, "daemon_socket": Path,
                "channel": ChannelKind, "fs": SharedFsKind}


def _device_to_dict(device: AnyDevice) -> dict[str, Any]:
    data = {k: (v.value if isinstance(v, enum.Enum) else str(v) if isinstance(v, Path) else v)
            for k, v in asdict(device).items() if k != "kind"}
    return {"type": type(device).__name__, **data}


def _device_from_dict(data: dict[str, Any]) -> AnyDevice:
    cls = _DEVICE_TYPES[data["type"]]
    names = {f.name for f in fields(cls) if f.init}
    kwargs = {k: (_FIELD_TYPES[k](v) if k in _FIELD_TYPES and v is not None else v)
              for k, v in data.items() if k in names}
    return cls(**kwargs)
