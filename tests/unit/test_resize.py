"""Growing a VM: the Hypervisor interface's resize_vcpu / resize_memory, declared by capability
(QEMU's QMP steps against a recording QMP; every other backend refuses by name), and how a pod's
size follows its containers' limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, UnsupportedOperation
from kabuto.hypervisor.base import Hypervisor, VmStatus
from kabuto.hypervisor.dragonball.backend import Dragonball
from kabuto.hypervisor.qemu import resize
from kabuto.hypervisor.registry import get_plugin, registered_names
from kabuto.runtime.resources import memory_limit_mib, pod_size, updated

MIB = 1024 * 1024


class RecordingQmp:
    """Answers query-hotpluggable-cpus from ``slots`` and records every other command."""

    def __init__(self, slots: list[dict[str, Any]] | None = None, fail: str = "") -> None:
        self.slots = slots or []
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-hotpluggable-cpus":
            return self.slots
        self.calls.append((command, arguments))
        if command == self.fail:
            raise HypervisorError(f"qemu: QMP {command} failed: refused")
        return {}


def table(**keys: Any) -> HypervisorConfig:
    return HypervisorConfig(**{"default_memory": 512, "default_maxmemory": 1024, "memory_slots": 2,
                               "default_vcpus": 1, "default_maxvcpus": 2, **keys})


async def test_qemu_memory_grows_by_aligned_dimms_within_default_maxmemory() -> None:
    qmp, dimms = RecordingQmp(), []
    assert await resize.grow_memory(qmp, table(), dimms, 600, shared=True) == 640  # type: ignore[arg-type]
    assert dimms == [128]
    assert qmp.calls == [
        ("object-add", {"qom-type": "memory-backend-memfd", "id": "kabuto-dimm-mem0", "size": 128 * MIB,
                        "share": True}),
        ("device_add", {"driver": "pc-dimm", "id": "kabuto-dimm0", "memdev": "kabuto-dimm-mem0"}),
    ]
    # already that big: nothing plugged
    assert await resize.grow_memory(qmp, table(), dimms, 600, shared=True) == 640  # type: ignore[arg-type]
    assert len(qmp.calls) == 2
    with pytest.raises(HypervisorError, match="default_maxmemory is 1024 MiB"):
        await resize.grow_memory(qmp, table(), dimms, 2000, shared=True)  # type: ignore[arg-type]
    assert await resize.grow_memory(qmp, table(), dimms, 1000, shared=False) == 1024  # type: ignore[arg-type]
    assert qmp.calls[-2][1] == {"qom-type": "memory-backend-ram", "id": "kabuto-dimm-mem1", "size": 384 * MIB}
    with pytest.raises(HypervisorError, match="memory_slots"):
        await resize.grow_memory(qmp, table(default_maxmemory=4096), dimms, 2000, shared=False)  # type: ignore[arg-type]


async def test_a_refused_dimm_takes_its_backend_with_it() -> None:
    qmp, dimms = RecordingQmp(fail="device_add"), []
    with pytest.raises(HypervisorError, match="device_add"):
        await resize.grow_memory(qmp, table(), dimms, 600, shared=False)  # type: ignore[arg-type]
    assert [c[0] for c in qmp.calls] == ["object-add", "device_add", "object-del"] and dimms == []


async def test_qemu_vcpus_fill_free_slots_from_the_lowest() -> None:
    free = {"socket-id": 1, "core-id": 0, "thread-id": 0}
    slots = [{"type": "max-x86_64-cpu", "vcpus-count": 1, "props": free},
             {"type": "max-x86_64-cpu", "vcpus-count": 1, "props": {**free, "socket-id": 0},
              "qom-path": "/machine/unattached/device[0]"}]
    qmp = RecordingQmp(slots)
    assert await resize.grow_vcpus(qmp, table(), 2) == (1, 2)  # type: ignore[arg-type]
    assert qmp.calls == [("device_add", {"driver": "max-x86_64-cpu", "id": "kabuto-vcpu0-1-0",
                                         "socket-id": 1, "core-id": 0, "thread-id": 0})]
    with pytest.raises(HypervisorError, match="default_maxvcpus is 2"):
        await resize.grow_vcpus(qmp, table(), 3)  # type: ignore[arg-type]


def test_capabilities_offer_resizing_only_with_room_to_grow() -> None:
    caps = get_plugin("qemu").capabilities()
    assert caps.resize_vcpu and caps.resize_memory
    roomy = caps.configured(table())
    assert roomy.resize_vcpu and roomy.resize_memory
    tight = caps.configured(table(default_maxmemory=0, default_maxvcpus=0))
    assert not (tight.resize_vcpu or tight.resize_memory)


@pytest.mark.parametrize("name", [n for n in registered_names() if n != "qemu"])
async def test_other_backends_refuse_resizing_by_name(name: str, tmp_path: Path) -> None:
    plugin = get_plugin(name)
    assert not (plugin.capabilities().resize_vcpu or plugin.capabilities().resize_memory)
    if name == "dragonball":  # its backend without the (unobtainable) binding: the base class's part
        backend: Hypervisor = Dragonball.__new__(Dragonball)
        Hypervisor.__init__(backend, table(), tmp_path, plugin=plugin)
    else:
        backend = plugin.backend()(table(), tmp_path, plugin=plugin)
    backend.status = VmStatus.RUNNING
    with pytest.raises(UnsupportedOperation, match=f"{name}: resizing memory"):
        await backend.resize_memory(1024)
    with pytest.raises(UnsupportedOperation, match=f"{name}: resizing vCPUs"):
        await backend.resize_vcpu(1, 2)


def test_a_pod_is_its_configured_size_plus_its_containers_limits() -> None:
    containers = [{"memory": {"limit": 96 * MIB}, "cpu": {"quota": 50000, "period": 100000}},
                  {"memory": {"limit": 1}}, {"memory": {"limit": -1}}, {}]
    assert pod_size(1, 512, containers) == (2, 512 + 96 + 1)
    assert memory_limit_mib({"memory": {"limit": True}}) == 0
    assert updated({"memory": {"limit": 1, "swap": 2}}, {"memory": {"limit": 3}, "pids": {"limit": 4}}) == \
        {"memory": {"limit": 3, "swap": 2}, "pids": {"limit": 4}}
