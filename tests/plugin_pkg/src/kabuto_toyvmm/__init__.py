"""A third-party hypervisor plugin: everything a VMM package needs to give Kabuto.

It boots nothing: its backend refuses every VM operation, which is enough to prove that
Kabuto discovers, configures and builds third-party backends.
"""

from __future__ import annotations

from pathlib import Path

from kabuto.config.model import HypervisorConfig
from kabuto.errors import Problem
from kabuto.hypervisor import Capabilities, Hypervisor, HypervisorState, VcpuThreadIds
from kabuto.hypervisor.devices import ChannelKind
from kabuto.hypervisor.plugin import Availability, BasePlugin

CAPABILITIES = Capabilities(agent_channels=(ChannelKind.VIRTIO_SERIAL,), notes=("a toy: boots nothing",))


class ToyVmm(Hypervisor):
    name = "toyvmm"
    capabilities = CAPABILITIES

    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        raise self._unsupported("prepare_vm")

    async def start_vm(self, timeout: float) -> None:
        raise self._unsupported("start_vm")

    async def stop_vm(self) -> None:
        raise self._unsupported("stop_vm")

    async def pause_vm(self) -> None:
        raise self._unsupported("pause_vm")

    async def resume_vm(self) -> None:
        raise self._unsupported("resume_vm")

    async def save_vm(self) -> Path:
        raise self._unsupported("save_vm")

    async def get_agent_socket(self) -> str:
        raise self._unsupported("get_agent_socket")

    async def disconnect(self) -> None:
        return None

    async def get_thread_ids(self) -> VcpuThreadIds:
        return VcpuThreadIds()

    async def get_pids(self) -> list[int]:
        return []

    async def cleanup(self) -> None:
        return None

    async def check(self) -> None:
        return None

    async def save_state(self) -> HypervisorState:
        raise self._unsupported("save_state")

    async def _take_over(self, state: HypervisorState) -> None:
        raise self._unsupported("restore")


class ToyVmmPlugin(BasePlugin):
    aliases = ("toy-vmm",)
    default_memory_mib = 128
    block_drivers = ("virtio-blk-pci",)

    def validate(self, table: HypervisorConfig) -> list[Problem]:
        problems = super().validate(table)
        if table.machine_type:
            problems.append(Problem("machine_type", table.machine_type, "the toy has no machine types"))
        return problems

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def availability(self, table: HypervisorConfig) -> Availability:
        return Availability(True, ["needs nothing from the host"], accelerator="none")

    def backend(self) -> type[Hypervisor]:
        return ToyVmm


plugin = ToyVmmPlugin()
