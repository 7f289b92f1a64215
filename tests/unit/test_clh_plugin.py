"""Cloud Hypervisor's plugin rules, availability and error-body reading."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import httpx
import psutil
import pytest

import kabuto.image
from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorUnavailable
from kabuto.hypervisor import host
from kabuto.hypervisor.cloud_hypervisor import plugin
from kabuto.hypervisor.cloud_hypervisor.backend import CloudHypervisor, describe_error
from kabuto.hypervisor.devices import ChannelKind, DeviceKind, SharedFsKind
from kabuto.hypervisor.registry import get_plugin

# the package exports ``plugin``, which hides the module of the same name from dotted lookups
PLUGIN_MODULE = importlib.import_module("kabuto.hypervisor.cloud_hypervisor.plugin")


@pytest.fixture(autouse=True)
def host_facts(monkeypatch):
    monkeypatch.setattr(host, "host_cpus", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=4 << 30))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


@pytest.fixture
def table(tmp_path) -> HypervisorConfig:
    files = {}
    for name in ("cloud-hypervisor", "virtiofsd", "vmlinux", "initrd"):
        path = tmp_path / name
        path.write_bytes(b"x")
        path.chmod(0o755)
        files[name] = str(path)
    return HypervisorConfig(
        path=files["cloud-hypervisor"],
        virtio_fs_daemon=files["virtiofsd"],
        kernel=files["vmlinux"],
        initrd=files["initrd"],
    )


def problems(table: HypervisorConfig) -> dict[str, str]:
    plugin.adjust(table)
    return {p.key: p.reason for p in plugin.validate(table)}


def test_registered_under_its_alias() -> None:
    assert get_plugin("clh") is plugin and get_plugin("cloud-hypervisor") is plugin


def test_defaults_and_a_valid_table(table) -> None:
    assert problems(table) == {}
    assert table.shared_fs == "virtio-fs" and table.block_device_driver == "virtio-blk-pci"
    assert table.default_maxvcpus == 4


def test_rules(table) -> None:
    table.jailer_path = table.path
    table.valid_jailer_paths = ["/usr/bin/*"]
    table.virtio_fs_daemon = ""
    table.block_device_driver = "virtio-blk-mmio"
    table.default_memory = 32
    found = problems(table)
    assert "no jailer" in found["jailer_path"]
    assert "must be empty" in found["valid_jailer_paths"]
    assert "virtiofsd" in found["virtio_fs_daemon"]
    assert "virtio-blk-pci" in found["block_device_driver"]
    assert "minimum of 64" in found["default_memory"]


def test_shared_fs_none_needs_no_virtiofsd(table) -> None:
    table.shared_fs, table.virtio_fs_daemon = "none", ""
    assert problems(table) == {}


def test_capabilities() -> None:
    caps = plugin.capabilities()
    assert {DeviceKind.BLOCK, DeviceKind.NETWORK, DeviceKind.SHARED_FS} == set(caps.hotplug)
    assert caps.pause and caps.snapshot and not caps.jailer
    assert caps.preferred_shared_fs() == SharedFsKind.VIRTIO_FS
    assert caps.agent_channels == (ChannelKind.HYBRID_VSOCK,)
    assert CloudHypervisor.capabilities is caps


def test_availability_names_every_reason(table, monkeypatch) -> None:
    monkeypatch.setattr(
        PLUGIN_MODULE,
        "kvm_usability",
        lambda: host.Accelerator("tcg", "/dev/kvm does not exist"),
    )
    table.path = "/nonexistent/cloud-hypervisor"
    table.virtio_fs_daemon = ""
    table.shared_fs = "virtio-fs"
    availability = plugin.availability(table)
    assert not availability.available
    text = " | ".join(availability.reasons)
    assert "cloud-hypervisor binary not found (/nonexistent/cloud-hypervisor)" in text
    assert "needs KVM: /dev/kvm does not exist" in text
    assert "virtiofsd not found" in text


def test_available_with_binary_and_kvm(table, monkeypatch) -> None:
    monkeypatch.setattr(PLUGIN_MODULE, "kvm_usability", lambda: host.Accelerator("kvm", "usable"))
    availability = plugin.availability(table)
    assert availability.available and availability.binary == table.path and availability.accelerator == "kvm"


async def test_check_raises_with_the_reasons(table) -> None:
    table.path = "/nonexistent/cloud-hypervisor"
    with pytest.raises(HypervisorUnavailable, match=r"^cloud-hypervisor: .*binary not found"):
        await CloudHypervisor(table).check()


def test_error_bodies() -> None:
    chain = httpx.Response(500, json=["Error from API", "The VM could not boot", "No kernel"])
    assert describe_error(chain) == "Error from API: The VM could not boot: No kernel"
    assert describe_error(httpx.Response(400, text="")) == "(empty body)"
    assert describe_error(httpx.Response(400, text="plain words")) == "plain words"


@pytest.mark.parametrize(("size", "ok"),
                         [(0, True), (128, True), (32768, True), (100, False), (65536, False)])
def test_queue_size_is_a_virtqueue_size(table, size, ok) -> None:
    table.queue_size = size
    assert ("queue_size" not in problems(table)) == ok
