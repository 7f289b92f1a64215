"""QemuHypervisor: one QEMU process per VM, driven through QMP.

The concerns live beside it: the command line (cmdline.py), the QMP session (qmp.py),
hot-plug (hotplug.py), the migration stream as snapshot (migration.py) and the guest console
(console.py); the process itself is the shared VmmProcess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPError

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, Hypervisor, HypervisorState, VcpuThreadIds, VmStatus
from kabuto.hypervisor.devices import (
    PORT_LOCK_SUFFIX,
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    SharedFsDevice,
    SharedFsKind,
    agent_vsock_port,
    device_from_dict,
    device_to_dict,
    serial_address,
)
from kabuto.hypervisor.host import Accelerator, choose_accelerator
from kabuto.hypervisor.plugin import HypervisorPlugin
from kabuto.hypervisor.qemu import migration, resize
from kabuto.hypervisor.qemu.cmdline import (
    MemoryFile,
    VmPaths,
    block_serial,
    build_command,
    memory_backend,
    use_vhost_net,
)
from kabuto.hypervisor.qemu.console import ConsoleReader, printable
from kabuto.hypervisor.qemu.hotplug import Hotplug
from kabuto.hypervisor.qemu.plugin import CAPABILITIES
from kabuto.hypervisor.qemu.plugin import plugin as qemu_plugin
from kabuto.hypervisor.qemu.qmp import QmpSession
from kabuto.hypervisor.virtiofsd import Virtiofsds
from kabuto.hypervisor.vmm_process import VmmProcess, check_socket_path
from kabuto.processes import pid_running

log = logging.getLogger(__name__)

AGENT_PORT_NAME = "agent.channel.0"
AGENT_DEVICE_ID = "agent"
# A virtio-serial port takes one host connection at a time: this many ports let as many host
# processes (a streaming `run`, an `exec`, a `state`...) talk to the agent at once.
AGENT_PORT_COUNT = 4
DEV_VHOST_VSOCK = Path("/dev/vhost-vsock")
DEV_VHOST_NET = Path("/dev/vhost-net")
VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Bounds on every wait (seconds).
STOP_GRACE_TIMEOUT = 5.0
# a virtiofsd that exits gives QEMU this many 50 ms looks to be seen dead first (its own death)
QEMU_EXIT_GRACE_POLLS = 20
KILL_TIMEOUT = 5.0
ERROR_TAIL_CHARS = 1500
TCG_TB_SIZE_DEFAULT = HypervisorConfig.model_fields["tcg_tb_size"].default


class QemuHypervisor(Hypervisor):
    name = "qemu"
    capabilities = CAPABILITIES
    default_plugin = qemu_plugin

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT, *,
                 plugin: HypervisorPlugin | None = None) -> None:
        super().__init__(config, jailer_root, plugin=plugin)
        self.accelerator: Accelerator | None = None
        self._qemu: VmmProcess | None = None
        self._virtiofsd = Virtiofsds(self)
        # in the process that started the VM: stops it when a virtiofsd exits (see start_vm)
        self._share_watch: asyncio.Task[None] | None = None
        #: a share's daemon that exited under a running QEMU, which was then stopped (exit_reason)
        self._lost_share = ""
        self._qmp = QmpSession("", Path())
        self._console: ConsoleReader | None = None
        #: the virtio-serial agent ports after the primary one (none for vsock)
        self._extra_agent_ports: list[AgentChannel] = []
        self._hotplug_slots: dict[str, str] = {}
        #: MiB of each DIMM hot-added (resize_memory), in order
        self._dimms: list[int] = []
        self._vhost_net = False
        #: guest RAM in a file: set by save_template for the template's boot
        self._memory_file: MemoryFile | None = None

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
        check_socket_path(self.name, self.paths.qmp_socket, self.paths.console_socket, agent_lock)
        self.jailer_root.mkdir(parents=True, exist_ok=True)
        try:
            self.vm_path.mkdir(mode=0o750)
        except FileExistsError:
            raise self._error(f"VM directory {self.vm_path} already exists (is VM {id!r} running?)") from None
        self.netns = netns
        self._qmp = QmpSession(id, self.paths.qmp_socket)
        if _exists(DEV_VHOST_VSOCK):
            # A CID is host-global; a random one from the 32-bit space makes collisions negligible.
            agent = AgentChannel(AGENT_DEVICE_ID, ChannelKind.VSOCK, guest_cid=3 + secrets.randbelow(2**31),
                                 port=agent_vsock_port(self.config.kernel_params))
        else:
            agent = AgentChannel(AGENT_DEVICE_ID, ChannelKind.VIRTIO_SERIAL,
                                 socket_path=self.paths.agent_socket, name=AGENT_PORT_NAME)
            self._extra_agent_ports = [
                AgentChannel(f"{AGENT_DEVICE_ID}{index}", ChannelKind.VIRTIO_SERIAL,
                             socket_path=self.paths.agent_port_socket(index), name=f"agent.channel.{index}")
                for index in range(1, AGENT_PORT_COUNT)
            ]
        self.agent_channel = agent
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
        if self.accelerator.name == "kvm" and self.config.tcg_tb_size != TCG_TB_SIZE_DEFAULT:
            log.warning("qemu: tcg_tb_size = %d does nothing under KVM (it sizes TCG's translation cache)",
                        self.config.tcg_tb_size)
        self._vhost_net = use_vhost_net(self.config, self.accelerator, _exists(DEV_VHOST_NET))
        started = time.monotonic()
        async with self._removed_on_failure(f"qemu: VM {self.id} did not boot within {timeout:g}s"), \
                asyncio.timeout(timeout):
            # virtio-fs shares: their daemons' sockets go on QEMU's command line
            await self._virtiofsd.start_all(self.pending_devices, started + timeout)
            self._share_watch = asyncio.create_task(self._stop_when_a_share_is_lost())
            self.boot_timings["virtiofsd_ready"] = time.monotonic() - started
            command = build_command(self.config, self.accelerator, self.paths, self.pending_devices,
                                    self.id, incoming=restore_from is not None, vhost_net=self._vhost_net,
                                    memory_file=self._memory_file)
            for device in self.pending_devices:
                if isinstance(device, BlockDevice):  # as hot-plug names it: the guest finds it so
                    device.guest_address = serial_address(block_serial(device))
            log.debug("qemu command: %s", command)
            self._qemu = VmmProcess(self.name, "QEMU", self.paths.qemu_log)
            await self._qemu.spawn(command, netns=self.netns)
            self.boot_timings["vmm_spawned"] = time.monotonic() - started
            await self._qmp.connect(self._qemu, wait_for_socket=True)
            self.boot_timings["qmp_ready"] = time.monotonic() - started
            self._console = ConsoleReader(self.paths.console_socket, self.paths.console_log)
            await self._console.start()
            if restore_from is not None:
                await migration.load_from(self._qmp, Path(restore_from), self._until_exit_or)
                await self._qmp.call("cont")
            else:
                await self._boot_until_agent_port_opens(started)
        self.devices.extend(self.pending_devices)
        self.pending_devices.clear()
        self.status = VmStatus.RUNNING

    # -- VM templates ---------------------------------------------------------------------------
    async def save_template(self, memory: Path, state: Path, timeout: float,
                            warm_up: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Boot to agent-ready with guest RAM in ``memory`` (memory-backend-file, share=on: the
        guest's pages land in the file), pause, migrate the device state alone into ``state``
        (x-ignore-shared leaves the shared RAM out) and quit; the file keeps the RAM."""
        self._require(VmStatus.PREPARED, operation="make a template")
        extra = [d for d in self.pending_devices if not isinstance(d, AgentChannel)]
        if extra:
            raise self._error(f"a template VM has no sandbox device (got {extra[0].id})")
        self._memory_file = MemoryFile(memory, shared=True)
        await self.start_vm(timeout)
        try:
            async with asyncio.timeout(timeout):
                if warm_up is not None:
                    await warm_up()
                await self.pause_vm()
                await self._ignore_shared_memory()
                await migration.save_to(self._qmp, state)
        except BaseException as exc:
            reason = await self._failure_tail()
            await self.cleanup()
            if isinstance(exc, TimeoutError):
                raise VmTimeout(f"qemu: template VM {self.id} was not saved within {timeout:g}s{reason}") \
                    from None
            raise
        assert self.accelerator is not None
        facts = {"accelerator": self.accelerator.name}
        await self.stop_vm()
        return facts

    async def start_from_template(self, memory: Path, state: Path, facts: dict[str, Any],
                                  timeout: float) -> None:
        """A clone: the template's command line (its agent ports; socket paths are no migration
        state) with its RAM file mapped private (share=off: copy-on-write), ``-incoming defer``,
        x-ignore-shared, the device state loaded, then ``cont``. The pending devices arrive by
        hot-plug once it runs: a 9p share's -fsdev backend rides on the command line."""
        self._require(VmStatus.PREPARED, operation="start the VM from a template")
        self.accelerator = choose_accelerator(self.config.accel)
        if facts.get("accelerator") != self.accelerator.name:
            raise self._error(f"the template was made under {facts.get('accelerator')!r}, this VM would "
                              f"run under {self.accelerator.name!r}")
        for device in self.pending_devices:
            if isinstance(device, SharedFsDevice) and device.fs != SharedFsKind.VIRTIO_9P:
                raise self._error(f"share {device.id}: a clone of a template maps its memory private; "
                                  f"{device.fs.value} needs it shared (use virtio-9p)")
        self._vhost_net = use_vhost_net(self.config, self.accelerator, _exists(DEV_VHOST_NET))
        channels = [d for d in self.pending_devices if isinstance(d, AgentChannel)]
        later = [d for d in self.pending_devices if not isinstance(d, AgentChannel)]
        shares = [d for d in later if isinstance(d, SharedFsDevice)]
        started = time.monotonic()
        async with self._removed_on_failure(f"qemu: VM {self.id} did not start from its template within "
                                            f"{timeout:g}s"), asyncio.timeout(timeout):
            command = build_command(self.config, self.accelerator, self.paths, channels, self.id,
                                    incoming=True, vhost_net=self._vhost_net,
                                    memory_file=MemoryFile(memory, shared=False), fsdevs=shares)
            log.debug("qemu command: %s", command)
            self._qemu = VmmProcess(self.name, "QEMU", self.paths.qemu_log)
            await self._qemu.spawn(command, netns=self.netns)
            self.boot_timings["vmm_spawned"] = time.monotonic() - started
            await self._qmp.connect(self._qemu, wait_for_socket=True)
            self._console = ConsoleReader(self.paths.console_socket, self.paths.console_log)
            await self._console.start()
            await self._ignore_shared_memory()
            await migration.load_from(self._qmp, state, self._until_exit_or)
            await self._qmp.call("cont")
            self.boot_timings["restored"] = time.monotonic() - started
            self.devices.extend(channels)
            self.pending_devices = later
            self.status = VmStatus.RUNNING
            for device in later:
                await self._hotplug_add(device)
                self.pending_devices.remove(device)
                self.devices.append(device)
            self.boot_timings["devices_plugged"] = time.monotonic() - started

    @contextlib.asynccontextmanager
    async def _removed_on_failure(self, not_in_time: str) -> AsyncIterator[None]:
        """Any failure inside kills QEMU, removes what the VM made and adds QEMU's last words to
        the error; a timeout becomes VmTimeout(``not_in_time`` and those words)."""
        try:
            yield
        except TimeoutError:
            reason = await self._failure_tail()
            await self.cleanup()
            raise VmTimeout(f"{not_in_time}{reason}") from None
        except BaseException as exc:
            reason = await self._failure_tail()
            await self.cleanup()
            if isinstance(exc, HypervisorError):
                raise type(exc)(f"{exc}{reason}") from exc
            raise

    async def _ignore_shared_memory(self) -> None:
        await self._qmp.call("migrate-set-capabilities",
                             {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})

    async def _stop_when_a_share_is_lost(self) -> None:
        """A virtiofsd that exits takes its share with it: the guest's reads and writes there never
        complete, so the VM is killed (QEMU's exit is what boot, agent calls and containers see;
        a failed boot's error says why, ``_failure_tail``)."""
        lost = await self._virtiofsd.first_exit()
        # a QEMU that died first takes its daemons with it (they see their socket close): that is
        # no lost share, and its own death is what the callers report
        for _ in range(QEMU_EXIT_GRACE_POLLS):
            if self._qemu is None or not pid_running(self._qemu.pid):
                return
            await asyncio.sleep(0.05)
        self._lost_share = lost
        log.error("qemu: VM %s: %s: the guest lost that share; stopping the VM", self.id, lost)
        await self._kill()

    async def _stop_share_watch(self) -> None:
        watch, self._share_watch = self._share_watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _boot_until_agent_port_opens(self, started: float) -> None:
        agent = self.agent_channel
        if agent is None or agent.channel != ChannelKind.VIRTIO_SERIAL:
            await self._qmp.call("cont")
            return
        listener = EventListener("VSERPORT_CHANGE",
                                 lambda e: e["data"].get("id") == agent.id and e["data"].get("open") is True)
        with self._qmp.listen(listener):
            await self._qmp.call("cont")
            self.boot_timings["guest_started"] = time.monotonic() - started
            await self._until_exit_or(listener.get(), "before the guest agent opened its port")
        self.boot_timings["guest_port_open"] = time.monotonic() - started

    async def _until_exit_or(self, awaitable: Any, what: str) -> Any:
        """Await ``awaitable`` unless QEMU exits first (then raise with the reason)."""
        assert self._qemu is not None
        task = asyncio.ensure_future(awaitable)
        exited = asyncio.ensure_future(self._qemu.wait_exit(None))
        try:
            done, _ = await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, exited):
                pending.cancel()
            await asyncio.gather(task, exited, return_exceptions=True)
        if task in done and not task.cancelled():
            return task.result()
        status = self._qemu.returncode
        raise self._error(f"QEMU exited{'' if status is None else f' (status {status})'} {what}")

    async def stop_vm(self) -> None:
        if self.status in (VmStatus.NEW, VmStatus.PREPARED, VmStatus.STOPPED):
            return
        # QEMU's quit ends the daemons too: that is no lost share
        await self._stop_share_watch()
        # `quit` lets QEMU flush its block devices; the guest itself is disposable.
        try:
            if not self._qmp.connected:
                # dropped by disconnect() so that other processes could use QMP meanwhile
                await self._qmp.connect(None, wait_for_socket=False)
            await self._qmp.call("quit", timeout=STOP_GRACE_TIMEOUT)
        except (HypervisorError, QMPError, OSError):
            pass
        if self._qemu is not None and not await self._qemu.wait_exit(STOP_GRACE_TIMEOUT):
            log.warning("qemu: VM %s did not quit within %gs, killing it", self.id, STOP_GRACE_TIMEOUT)
        await self._kill()
        await self._virtiofsd.stop_all()
        await self.disconnect()
        self.status = VmStatus.STOPPED

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._qmp.call("stop")
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._qmp.call("cont")
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        """Pause the VM and migrate its state into ``<vm dir>/vm.state``; the VM stays paused."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="save")
        if not self.capabilities.snapshot:
            raise self._unsupported(f"snapshot with shared_fs = {self.config.shared_fs!r}")
        if self.status == VmStatus.RUNNING:
            await self.pause_vm()
        await migration.save_to(self._qmp, self.paths.saved_state)
        return self.paths.saved_state

    # -- devices ------------------------------------------------------------------------------
    def _hotplug(self) -> Hotplug:
        return Hotplug(self._qmp, self.config, self._hotplug_slots, self._vhost_net)

    async def _hotplug_add(self, device: AnyDevice) -> None:
        async with self._qemu_death_explained():
            await self._hotplug().add(device)

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        async with self._qemu_death_explained():
            await self._hotplug().remove(device)

    @contextlib.asynccontextmanager
    async def _qemu_death_explained(self) -> AsyncIterator[None]:
        """A QMP call that failed because QEMU ended (qemu.qmp says only "Disconnected") gets
        how it ended and its last words."""
        try:
            yield
        except HypervisorError as exc:
            for _ in range(QEMU_EXIT_GRACE_POLLS):  # the socket closes a moment before the exit
                if self._qemu is None or not self._qemu.alive():
                    break
                await asyncio.sleep(0.05)
            if self._qemu is None or self._qemu.alive():
                raise
            await self._qemu.output_done()
            raise type(exc)(f"{exc}: {self._qemu.exit_description()}") from exc

    # -- resizing -----------------------------------------------------------------------------
    async def _resize_vcpu(self, old: int, new: int) -> tuple[int, int]:
        async with self._qemu_death_explained():
            return await resize.grow_vcpus(self._qmp, self.config, new)

    async def _resize_memory(self, new_mib: int) -> int:
        shared = bool(memory_backend(self.config, self.devices))
        async with self._qemu_death_explained():
            return await resize.grow_memory(self._qmp, self.config, self._dimms, new_mib, shared)

    # -- queries ------------------------------------------------------------------------------
    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on the VM (diagnostics, tests), bounded like every other call."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation=f"run QMP {command}")
        return await self._qmp.call(command, arguments)

    async def get_agent_sockets(self) -> list[str]:
        return [await self.get_agent_socket(), *(port.url() for port in self._extra_agent_ports)]

    async def get_thread_ids(self) -> VcpuThreadIds:
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="list vCPU threads")
        cpus = await self._qmp.call("query-cpus-fast")
        return VcpuThreadIds({int(cpu["cpu-index"]): int(cpu["thread-id"]) for cpu in cpus})

    async def get_pids(self) -> list[int]:
        """QEMU's pid first, then its virtiofsd daemons'."""
        processes = [self._qemu, *self._virtiofsd.processes()]
        return [p.pid for p in processes if p is not None and p.pid is not None and p.alive()]

    def exit_reason(self) -> str:
        if self._lost_share:
            return f"{self._lost_share}: the guest lost that share and the VM was stopped"
        if self._qemu is None or self._qemu.alive() or self._qemu.returncode is None:
            return ""
        if self._qemu.returncode == 0:
            # -no-reboot with the kernel's panic=1: a panic reboots, and a reboot ends QEMU
            return "the guest powered off or rebooted: its agent ended or its kernel panicked"
        return self._qemu.exit_description()

    # -- teardown -----------------------------------------------------------------------------
    async def disconnect(self) -> None:
        if self._console is not None:
            await self._console.stop()
            self._console = None
        await self._qmp.disconnect()

    async def release(self) -> None:
        # a virtiofsd's exit is the new owner's to act on
        await self._stop_share_watch()
        await self.disconnect()

    async def cleanup(self) -> None:
        await self._stop_share_watch()
        await self._kill()
        await self._virtiofsd.stop_all()
        await self.disconnect()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        self.status = VmStatus.STOPPED

    async def _kill(self) -> None:
        if self._qemu is not None and not await self._qemu.kill(KILL_TIMEOUT):
            log.error("qemu: pid %s survived SIGKILL for %gs", self._qemu.pid, KILL_TIMEOUT)

    # -- state for another process ------------------------------------------------------------
    async def save_state(self) -> HypervisorState:
        return await self._state({
            "qemu": self._qemu.record() if self._qemu is not None else None,
            "virtiofsd": self._virtiofsd.records(),
            "qmp_socket": str(self.paths.qmp_socket),
            "accelerator": self.accelerator.name if self.accelerator else "",
            "hotplug_slots": dict(self._hotplug_slots),
            "vhost_net": self._vhost_net,
            "extra_agent_ports": [device_to_dict(port) for port in self._extra_agent_ports],
            "dimms": list(self._dimms),
        })

    async def _take_over(self, state: HypervisorState) -> None:
        """Reconnect to a VM started by another process; a VM that is gone comes back STOPPED."""
        extra = state.extra
        self._qmp = QmpSession(self.id, self.paths.qmp_socket)
        self._hotplug_slots = dict(extra.get("hotplug_slots", {}))
        self._vhost_net = bool(extra.get("vhost_net", False))
        self._dimms = [int(size) for size in extra.get("dimms", [])]
        self._extra_agent_ports = [port for port in map(device_from_dict, extra.get("extra_agent_ports", []))
                                   if isinstance(port, AgentChannel)]
        qemu = VmmProcess(self.name, "QEMU", self.paths.qemu_log)
        try:
            qemu.adopt(extra.get("qemu") or {})
        except (HypervisorError, KeyError, ValueError, TypeError):
            self.status = VmStatus.STOPPED
            return
        self._qemu = qemu
        gone = self._virtiofsd.adopt(extra.get("virtiofsd", {}))
        if gone:
            self._lost_share = lost = "; ".join(gone)
            log.error("qemu: VM %s: %s: the guest lost that share; stopping the VM", self.id, lost)
            await self._kill()
            await self._virtiofsd.stop_all()
            self.status = VmStatus.STOPPED
            return
        await self._qmp.connect(None, wait_for_socket=False)
        running = (await self._qmp.call("query-status")).get("running")
        self.status = VmStatus.RUNNING if running else VmStatus.PAUSED

    async def _failure_tail(self) -> str:
        """The end of QEMU's output and the guest console, for an error message."""
        parts = []
        stderr = ""
        if self._qemu is not None:
            if not self._qemu.alive():
                await self._qemu.output_done()
            stderr = self._qemu.log_tail()[-ERROR_TAIL_CHARS:]
        parts += await self._virtiofsd.exited()
        if stderr:
            parts.append(f"QEMU stderr: {stderr}")
        if self._console is not None:
            console = printable(self._console.tail()[-ERROR_TAIL_CHARS:]).strip()
            if console:
                parts.append(f"guest console (last lines):\n{console}")
        return "".join(f"\n{p}" for p in parts)


# host facts read once per boot: not worth a thread hop
def _exists(path: Path) -> bool:
    return path.exists()


def _is_file(path: Path) -> bool:
    return path.is_file()
