"""RestVmm: what Cloud Hypervisor and Firecracker share as backends.

Both spawn one VMM process per VM, drive it over a REST API on a Unix socket, and reach the
agent through hybrid vsock. This class holds the lifecycle around that (start and its failure
path, snapshot directory, teardown, saved state and takeover, the API call itself); each
backend supplies the VMM's command line, how it boots or restores, and the requests that differ.
Not a backend: both subclass it, neither imports the other.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.base import (
    DEFAULT_JAILER_ROOT,
    GUEST_PANIC_PARAMS,
    Hypervisor,
    HypervisorState,
    VcpuThreadIds,
    VmStatus,
)
from kabuto.hypervisor.devices import hybrid_vsock_agent_channel
from kabuto.hypervisor.plugin import HypervisorPlugin
from kabuto.hypervisor.rest_api import ApiClient, ApiTransportError
from kabuto.hypervisor.vmm_process import VmmProcess, check_socket_path, unlink_quietly, vcpu_thread_ids

log = logging.getLogger(__name__)

#: after an API connection failure, how long to wait for the VMM's exit to show
EXIT_NOTICE = 0.5


class RestVmm(Hypervisor):
    """A VMM process driven over a REST API on a Unix socket; the agent over hybrid vsock."""

    #: the VMM's program name: its messages and its log file ``<vm dir>/<program>.log``
    vmm_program: ClassVar[str]
    #: prefixed to every endpoint given to ``_call`` ("/api/v1/" for Cloud Hypervisor)
    api_root: ClassVar[str] = ""
    #: a cheap GET that proves the VMM answers (after taking over a VM from saved state)
    probe_endpoint: ClassVar[str]
    #: the VMM's vCPU thread names; group 1 is the vCPU index
    vcpu_thread: ClassVar[re.Pattern[str]]
    #: which VM ids the VMM (or its jailer) accepts, and that rule in words for the error
    vm_id_pattern: ClassVar[re.Pattern[str]]
    vm_id_rule: ClassVar[str]

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT, *,
                 plugin: HypervisorPlugin | None = None) -> None:
        super().__init__(config, jailer_root, plugin=plugin)
        self._vmm: VmmProcess | None = None
        self._api: ApiClient | None = None
        # what start_vm was doing, for a timeout's message
        self._stage = "not started"

    # -- what each backend supplies -----------------------------------------------------------
    @property
    @abc.abstractmethod
    def api_socket(self) -> Path: ...

    @property
    @abc.abstractmethod
    def vsock_socket(self) -> Path: ...

    @property
    @abc.abstractmethod
    def snapshot_dir(self) -> Path: ...

    @staticmethod
    @abc.abstractmethod
    def describe_api_error(response: httpx.Response) -> str:
        """The VMM's error body in words, for a HypervisorError."""

    @abc.abstractmethod
    def _vmm_argv(self) -> list[str]:
        """The command that starts the VMM with its API socket at ``api_socket``."""

    @abc.abstractmethod
    async def _boot(self, deadline: float, restore_from: Path | None) -> None:
        """With the VMM answering: configure and boot, or restore ``restore_from`` and resume."""

    @abc.abstractmethod
    async def _set_running(self, running: bool) -> None:
        """Resume (True) or pause (False) the vCPUs."""

    @abc.abstractmethod
    async def _snapshot(self, directory: Path) -> None:
        """Write the paused VM's snapshot into the empty ``directory``."""

    def _prepare_restore(self, snapshot: Path) -> None:
        """Check a ``save_vm`` snapshot (and adapt it to this VM) before anything is started."""

    @property
    def _spawned_program(self) -> str:
        """What ``_vmm_argv`` runs: the VMM, or a launcher that execs it."""
        return self.vmm_program

    @property
    def _spawn_netns(self) -> str | None:
        """The netns the VMM is spawned in (None where a launcher joins it itself)."""
        return self.netns

    def _make_vm_dir(self) -> None:
        self.vm_path.mkdir(parents=True, exist_ok=False, mode=0o750)

    def _helper_processes(self) -> list[VmmProcess]:
        """Processes besides the VMM that serve this VM (virtiofsd)."""
        return []

    async def _stop_helpers(self) -> None:
        """Stop the helper processes and remove their sockets."""

    def _own_state(self) -> dict[str, Any]:
        """What ``save_state`` records beyond the shared fields."""
        return {}

    def _adopt_helpers(self, extra: dict[str, Any]) -> list[str]:
        """``restore``'s part for what ``_own_state`` recorded: adopt the helper processes; what
        is gone of them (the VM is stopped then)."""
        return []

    # -- lifecycle ----------------------------------------------------------------------------
    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self._require(VmStatus.NEW, operation="prepare the VM")
        if not self.vm_id_pattern.fullmatch(id):
            raise self._error(f"invalid VM id {id!r}: use {self.vm_id_rule}")
        self.id = id
        self.netns = netns
        check_socket_path(self.name, self.api_socket, self.vsock_socket)
        self._make_vm_dir()
        self.agent_channel = hybrid_vsock_agent_channel(self.vsock_socket, self.config.kernel_params)
        self.pending_devices.append(self.agent_channel)
        self.status = VmStatus.PREPARED

    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        """Boot, or with ``restore_from`` (a ``save_vm`` snapshot) restore into this fresh VMM and
        resume; within ``timeout``. A failure stops every process and removes the VM directory."""
        self._require(VmStatus.PREPARED, operation="start the VM")
        if restore_from is not None:
            self._prepare_restore(restore_from)
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._launch(deadline)
                await self._boot(deadline, restore_from)
        except TimeoutError:
            await self.cleanup()
            raise VmTimeout(
                f"{self.name}: VM {self.id} did not start within {timeout:g}s ({self._stage})"
            ) from None
        except BaseException:
            await self.cleanup()
            raise
        self.devices, self.pending_devices = self.pending_devices, []
        self.status = VmStatus.RUNNING

    async def _launch(self, deadline: float) -> None:
        argv = self._vmm_argv()
        self._vmm = VmmProcess(self.name, self._spawned_program, self._vmm_log)
        await self._vmm.spawn(argv, cwd=self.vm_path, netns=self._spawn_netns)
        self._stage = f"waiting for the API socket {self.api_socket}"
        await self._vmm.wait_for_socket(self.api_socket, deadline - time.monotonic())
        self._api = self._api_client()

    def _kernel_cmdline(self, *vmm_params: str) -> str:
        """The guest's command line; the configured image is the first virtio disk, /dev/vda."""
        params = ["console=ttyS0", GUEST_PANIC_PARAMS, *vmm_params]
        if self.config.image:
            params.append("root=/dev/vda ro")
        if self.config.kernel_params:
            params.append(self.config.kernel_params)
        return " ".join(params)

    @property
    def _vmm_log(self) -> Path:
        return self.vm_path / f"{self.vmm_program}.log"

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._set_running(False)
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._set_running(True)
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        """Pause the VM and snapshot it into ``snapshot_dir``; the VM stays paused."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="snapshot")
        if self.status == VmStatus.RUNNING:
            await self.pause_vm()
        if self.snapshot_dir.exists():
            shutil.rmtree(self.snapshot_dir)
        self.snapshot_dir.mkdir(mode=0o700)
        await self._snapshot(self.snapshot_dir)
        return self.snapshot_dir

    # -- queries ------------------------------------------------------------------------------
    async def disconnect(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def get_thread_ids(self) -> VcpuThreadIds:
        vmm = self._vmm
        if vmm is None or vmm.pid is None or not vmm.alive():
            return VcpuThreadIds()
        return VcpuThreadIds(vcpu_thread_ids(vmm.pid, self.vcpu_thread))

    async def get_pids(self) -> list[int]:
        procs = [self._vmm, *self._helper_processes()]
        return [p.pid for p in procs if p is not None and p.pid is not None and p.alive()]

    def exit_reason(self) -> str:
        if self._vmm is None or self._vmm.alive() or self._vmm.returncode is None:
            return ""
        return self._vmm.exit_description()

    # -- host side ----------------------------------------------------------------------------
    async def cleanup(self) -> None:
        await self._teardown()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def _teardown(self) -> None:
        """Stop every process we run and drop the API client and sockets; keeps the VM dir."""
        await self.disconnect()
        await self._stop_helpers()
        if self._vmm is not None:
            await self._vmm.stop()
            self._vmm = None
        if self.id:
            for path in (self.api_socket, self.vsock_socket):
                unlink_quietly(path)

    async def save_state(self) -> HypervisorState:
        return await self._state({
            "api_socket": str(self.api_socket) if self.id else "",
            "vmm": self._vmm.record() if self._vmm is not None else None,
            **self._own_state(),
        })

    async def _take_over(self, state: HypervisorState) -> None:
        """Drive the VM another process started (its VMM adopted, never spawned again)."""
        extra = state.extra
        gone = self._adopt_helpers(extra)
        vmm = extra.get("vmm")
        if vmm and self.status in (VmStatus.RUNNING, VmStatus.PAUSED):
            self._vmm = VmmProcess(self.name, self.vmm_program, self._vmm_log)
            self._vmm.adopt(vmm)
            if gone:
                log.error("%s: VM %s: %s; stopping the VM", self.name, self.id, "; ".join(gone))
                await self._teardown()
                self.status = VmStatus.STOPPED
                return
            self._api = self._api_client()
            await self._call("GET", self.probe_endpoint)

    # -- API ----------------------------------------------------------------------------------
    def _api_client(self) -> ApiClient:
        return ApiClient(self.name, self.api_socket, self.describe_api_error)

    async def _call(self, method: str, endpoint: str, body: Any = None) -> httpx.Response:
        """One API request, bounded; a failure caused by the VMM's death says so."""
        what = f"{method} {endpoint}"
        if self._api is None:
            # after disconnect() the VMM still runs: reconnect on demand
            if self._vmm is None or not self._vmm.alive():
                raise self._error(f"{what}: no VMM is running (VM is {self.status.value})")
            self._api = self._api_client()
        self._stage = f"waiting for {what}"
        try:
            return await self._api.request(method, self.api_root + endpoint, body)
        except HypervisorError as exc:
            if self._vmm is not None and await self._vmm_died(exc):
                raise self._error(f"{what}: {self._vmm.exit_description()}") from None
            raise

    async def _vmm_died(self, error: HypervisorError) -> bool:
        """Whether the VMM is gone; after a failed connection, give its exit a moment to show."""
        assert self._vmm is not None
        if isinstance(error, ApiTransportError):
            return await self._vmm.wait_exit(EXIT_NOTICE)
        return not self._vmm.alive()
