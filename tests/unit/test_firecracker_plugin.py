"""Firecracker's plugin rules, capabilities and API helpers."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import httpx
import psutil
import pytest

import kabuto.image
from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor import host
from kabuto.hypervisor.devices import ChannelKind, DeviceKind
from kabuto.hypervisor.firecracker import plugin
from kabuto.hypervisor.firecracker.backend import Firecracker, describe_error, resource_id
from kabuto.hypervisor.registry import get_plugin

# the package exports ``plugin``, which hides the module of the same name from dotted lookups
PLUGIN_MODULE = importlib.import_module("kabuto.hypervisor.firecracker.plugin")


@pytest.fixture(autouse=True)
def host_facts(monkeypatch):
    monkeypatch.setattr(host, "host_cpus", lambda: 64)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=16 << 30))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


@pytest.fixture
def table(tmp_path) -> HypervisorConfig:
    files = {}
    for name in ("firecracker", "jailer", "vmlinux", "rootfs.img"):
        path = tmp_path / name
        path.write_bytes(b"x")
        path.chmod(0o755)
        files[name] = str(path)
    return HypervisorConfig(path=files["firecracker"], kernel=files["vmlinux"], image=files["rootfs.img"])


def problems(table: HypervisorConfig) -> dict[str, str]:
    plugin.adjust(table)
    return {p.key: p.reason for p in plugin.validate(table)}


def test_registered_under_its_alias() -> None:
    assert get_plugin("fc") is plugin and get_plugin("firecracker") is plugin


def test_defaults_and_a_valid_table(table) -> None:
    assert problems(table) == {}
    assert table.shared_fs == "none" and table.block_device_driver == "virtio-blk-mmio"
    assert table.default_maxvcpus == 32  # the host's 64 CPUs, capped at Firecracker's limit


def test_rules(table) -> None:
    table.default_maxvcpus = 33
    table.default_memory = 64
    table.shared_fs = "virtio-fs"
    found = problems(table)
    assert "at most 32" in found["default_maxvcpus"]
    assert "minimum of 128" in found["default_memory"]
    assert "must be one of none" in found["shared_fs"]


def test_jailer_is_allowed_and_checked(table, tmp_path) -> None:
    table.jailer_path = str(tmp_path / "jailer")
    assert problems(table) == {}
    table.jailer_path = "/nonexistent/jailer"
    assert "does not exist" in problems(table)["jailer_path"]


def test_jailer_needs_firecracker_in_the_binary_name(table, tmp_path) -> None:
    table.jailer_path = str(tmp_path / "jailer")
    renamed = tmp_path / "fc-vmm"
    renamed.write_bytes(b"x")
    renamed.chmod(0o755)
    table.path = str(renamed)
    assert "must contain 'firecracker'" in problems(table)["path"]
    table.jailer_path = ""
    assert problems(table) == {}


def test_capabilities_say_no_hotplug_and_no_shared_fs() -> None:
    caps = plugin.capabilities()
    assert not caps.hotplug and not caps.shared_fs and caps.preferred_shared_fs() is None
    assert not any(caps.can_hotplug(kind) for kind in DeviceKind)
    assert caps.pause and caps.snapshot and caps.jailer
    assert caps.agent_channels == (ChannelKind.HYBRID_VSOCK,)
    assert Firecracker.capabilities is caps


def test_availability_names_every_reason(table, monkeypatch) -> None:
    monkeypatch.setattr(
        PLUGIN_MODULE,
        "kvm_usability",
        lambda: host.Accelerator("tcg", "/dev/kvm is backed by PVM"),
    )
    table.path, table.jailer_path = "/nonexistent/firecracker", "/nonexistent/jailer"
    reasons = " | ".join(plugin.availability(table).reasons)
    assert "firecracker binary not found (/nonexistent/firecracker)" in reasons
    assert "jailer not found or not executable (/nonexistent/jailer)" in reasons
    assert "needs KVM: /dev/kvm is backed by PVM" in reasons


def test_api_helpers() -> None:
    assert describe_error(httpx.Response(400, json={"fault_message": "Invalid ID"})) == "Invalid ID"
    assert describe_error(httpx.Response(400, json={"other": 1})) == '{"other": 1}'
    assert resource_id("ctr-rootfs.1") == "ctr_rootfs_1"


def test_network_queues_above_one_are_refused(table) -> None:
    table.network_queues = 1
    assert problems(table) == {}
    table.network_queues = 2
    assert problems(table) == {"network_queues": "this VMM's virtio-net takes at most 1 queue pair(s)"}
