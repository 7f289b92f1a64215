"""Dragonball backend: drives a registered DragonballBinding (none exists yet; see binding.py).

The VMM runs inside this process, so there is no VMM process to spawn or kill: every
operation is a call into the binding, run in a worker thread and bounded in time.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable, VmTimeout
from kabuto.hypervisor.base import (
    DEFAULT_JAILER_ROOT,
    GUEST_PANIC_PARAMS,
    Hypervisor,
    HypervisorState,
    VcpuThreadIds,
    VmStatus,
)
from kabuto.hypervisor.devices import AnyDevice, hybrid_vsock_agent_channel
from kabuto.hypervisor.dragonball.binding import UNAVAILABLE_REASON, DragonballBinding, current_binding
from kabuto.hypervisor.dragonball.plugin import CAPABILITIES
from kabuto.hypervisor.dragonball.plugin import plugin as dragonball_plugin
from kabuto.hypervisor.plugin import HypervisorPlugin

#: bound on one call into the binding (start gets the caller's timeout instead)
CALL_TIMEOUT = 30.0
_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _device_config(device: AnyDevice) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(device).items()}


class Dragonball(Hypervisor):
    name = "dragonball"
    capabilities = CAPABILITIES
    default_plugin = dragonball_plugin

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT, *,
                 plugin: HypervisorPlugin | None = None) -> None:
        super().__init__(config, jailer_root, plugin=plugin)
        binding = current_binding()
        if binding is None:
            raise HypervisorUnavailable(f"{self.name}: {UNAVAILABLE_REASON}")
        self._binding: DragonballBinding = binding
        self._vm: Any = None

    @property
    def vsock_socket(self) -> Path:
        return self.vm_path / "db-vm.sock"

    async def _run(self, what: str, func: Any, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(func, *args), timeout)
        except TimeoutError as exc:
            raise VmTimeout(f"{self.name}: {what} did not finish within {timeout:g}s") from exc
        except HypervisorError:
            raise
        except Exception as exc:  # the binding's own errors, named
            raise self._error(f"{what} failed: {exc}") from exc

    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self._require(VmStatus.NEW, operation="prepare the VM")
        if not _ID_OK.fullmatch(id):
            raise self._error(f"invalid VM id {id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        self.id = id
        self.netns = netns
        self.vm_path.mkdir(parents=True, exist_ok=False, mode=0o750)
        self.agent_channel = hybrid_vsock_agent_channel(self.vsock_socket, self.config.kernel_params)
        self.pending_devices.append(self.agent_channel)
        self.status = VmStatus.PREPARED

    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        if restore_from is not None:
            raise self._unsupported("starting from a saved VM")
        self._require(VmStatus.PREPARED, operation="start the VM")
        cfg = self.config
        vm_config = {
            "vcpus": max(1, math.ceil(cfg.default_vcpus)),
            "max_vcpus": cfg.default_maxvcpus,
            "memory_mib": cfg.default_memory,
            "kernel": cfg.kernel,
            "initrd": cfg.initrd,
            "image": cfg.image,
            "kernel_params": f"{GUEST_PANIC_PARAMS} {cfg.kernel_params}".strip(),
            "vsock_path": str(self.vsock_socket),
        }
        try:
            self._vm = await self._run("create_vm", self._binding.create_vm, self.id, vm_config)
            for device in self.pending_devices:
                await self._insert(device)
            await self._run("start", self._binding.start, self._vm, timeout=timeout)
        except BaseException:
            await self.cleanup()
            raise
        self.devices, self.pending_devices = self.pending_devices, []
        self.status = VmStatus.RUNNING

    async def stop_vm(self) -> None:
        if self._vm is not None and self.status in (VmStatus.RUNNING, VmStatus.PAUSED):
            await self._run("stop", self._binding.stop, self._vm)
        self._vm = None
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._run("pause", self._binding.pause, self._vm)
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._run("resume", self._binding.resume, self._vm)
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        raise self._unsupported("snapshot")

    async def _insert(self, device: AnyDevice) -> None:
        config = _device_config(device)
        insert = self._binding.insert_device
        await self._run(f"insert {device.id}", insert, self._vm, device.kind.value, config)

    async def _hotplug_add(self, device: AnyDevice) -> None:
        await self._insert(device)

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        await self._run(f"remove {device.id}", self._binding.remove_device, self._vm, device.id)

    async def disconnect(self) -> None:
        """Nothing to drop: the VMM lives in this process."""

    async def get_thread_ids(self) -> VcpuThreadIds:
        if self._vm is None:
            return VcpuThreadIds()
        threads = await self._run("vcpu_thread_ids", self._binding.vcpu_thread_ids, self._vm)
        return VcpuThreadIds(dict(threads))

    async def get_pids(self) -> list[int]:
        # in-process: the VMM is this process
        return [os.getpid()] if self._vm is not None else []

    async def cleanup(self) -> None:
        if self._vm is not None:
            try:
                await self.stop_vm()
            finally:
                self._vm = None
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def check(self) -> None:
        if current_binding() is None:
            raise HypervisorUnavailable(f"{self.name}: {UNAVAILABLE_REASON}")

    async def save_state(self) -> HypervisorState:
        return await self._state()

    async def _take_over(self, state: HypervisorState) -> None:
        # An in-process VM dies with the process that ran it: another process cannot take over.
        raise self._error(f"the VM {state.id!r} ran inside another process; "
                          "it cannot be driven from this one")
