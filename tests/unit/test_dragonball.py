"""Dragonball: plugin rules, why it is unavailable, and the binding seam with a fake binding."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

import kabuto.image
from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable, UnsupportedOperation
from kabuto.hypervisor import host
from kabuto.hypervisor.base import HypervisorState, VmStatus
from kabuto.hypervisor.devices import BlockDevice
from kabuto.hypervisor.dragonball import DragonballBinding, plugin, register_binding
from kabuto.hypervisor.dragonball.binding import UNAVAILABLE_REASON
from kabuto.hypervisor.registry import get_plugin


@pytest.fixture(autouse=True)
def host_facts(monkeypatch):
    monkeypatch.setattr(host, "host_cpus", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=4 << 30))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


@pytest.fixture
def table(tmp_path) -> HypervisorConfig:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return HypervisorConfig(kernel=str(kernel), initrd=str(initrd))


def problems(table: HypervisorConfig) -> dict[str, str]:
    plugin.adjust(table)
    return {p.key: p.reason for p in plugin.validate(table)}


def test_kata_rules(table) -> None:
    assert problems(table) == {}
    assert table.default_bridges == 0 and table.shared_fs == "virtio-fs"
    bad = table.model_copy(
        update={"machine_type": "q35", "enable_iothreads": True, "rootless": True, "pcie_root_port": 2}
    )
    bad.path = "/usr/bin/qemu-system-x86_64"
    bad.default_bridges = 1
    bad.shared_fs = "virtio-9p"
    found = problems(bad)
    assert "built into the runtime" in found["path"] and "built into the runtime" in found["machine_type"]
    assert "does not support" in found["enable_iothreads"] and "does not support" in found["rootless"]
    assert "no PCI bridges" in found["default_bridges"]
    assert "no PCIe root ports" in found["pcie_root_port"]
    assert "virtio-fs, inline-virtio-fs" in found["shared_fs"]


def test_unavailable_says_why(table) -> None:
    assert get_plugin("dragonball") is plugin
    availability = plugin.availability(table)
    assert not availability.available and availability.reasons == [UNAVAILABLE_REASON]
    assert "no Python binding" in UNAVAILABLE_REASON and "runtime-rs" in UNAVAILABLE_REASON
    with pytest.raises(HypervisorUnavailable, match=r"^dragonball: no Python binding"):
        plugin.backend()


class FakeBinding:
    """Stands in for a future PyO3 binding; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def create_vm(self, vm_id: str, config: dict[str, Any]) -> Any:
        self.calls.append(("create_vm", config))
        return {"id": vm_id}

    def insert_device(self, vm: Any, kind: str, config: dict[str, Any]) -> None:
        self.calls.append(("insert_device", (kind, config["id"])))

    def remove_device(self, vm: Any, device_id: str) -> None:
        self.calls.append(("remove_device", device_id))

    def start(self, vm: Any) -> None:
        self.calls.append(("start", None))

    def pause(self, vm: Any) -> None:
        self.calls.append(("pause", None))

    def resume(self, vm: Any) -> None:
        self.calls.append(("resume", None))

    def stop(self, vm: Any) -> None:
        self.calls.append(("stop", None))

    def vcpu_thread_ids(self, vm: Any) -> dict[int, int]:
        return {0: threading.get_native_id()}


@pytest.fixture
def binding():
    fake = FakeBinding()
    assert isinstance(fake, DragonballBinding)
    register_binding(fake)
    yield fake
    register_binding(None)


async def test_a_registered_binding_plugs_in(table, binding, tmp_path: Path) -> None:
    assert plugin.availability(table).available
    backend = plugin.backend()(table, jailer_root=tmp_path)
    await backend.prepare_vm("db1")
    disk = BlockDevice(id="disk0", path=tmp_path / "vmlinux")
    await backend.add_device(disk)
    await backend.start_vm(5)
    assert backend.status == VmStatus.RUNNING
    assert [c[0] for c in binding.calls] == ["create_vm", "insert_device", "insert_device", "start"]
    assert binding.calls[1][1] == ("agent-channel", "agent")
    assert await backend.get_agent_socket() == f"hvsock://{tmp_path / 'db1' / 'db-vm.sock'}:1024"
    await backend.pause_vm()
    with pytest.raises(UnsupportedOperation, match="dragonball: snapshot"):
        await backend.save_vm()
    await backend.resume_vm()
    await backend.remove_device(disk)
    assert binding.calls[-1] == ("remove_device", "disk0")
    assert list((await backend.get_thread_ids()).vcpus) == [0]
    state = await backend.save_state()
    with pytest.raises(HypervisorError, match="ran inside another process"):
        await type(backend).restore(state)
    await backend.cleanup()
    assert binding.calls[-1] == ("stop", None)
    assert not (tmp_path / "db1").exists()


async def test_binding_errors_are_named_and_start_cleans_up(table, binding, tmp_path: Path) -> None:
    def broken(vm: Any) -> None:
        raise RuntimeError("KVM_CREATE_VM: EBUSY")

    binding.start = broken
    backend = plugin.backend()(table, jailer_root=tmp_path)
    await backend.prepare_vm("db2")
    with pytest.raises(HypervisorError, match=r"^dragonball: start failed: KVM_CREATE_VM: EBUSY"):
        await backend.start_vm(5)
    assert backend.status == VmStatus.STOPPED and not (tmp_path / "db2").exists()


def test_a_non_binding_is_refused() -> None:
    with pytest.raises(TypeError):
        register_binding(object())  # type: ignore[arg-type]
    assert HypervisorState  # the seam does not change the state type
