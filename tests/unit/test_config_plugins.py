"""BasePlugin's adjust and validate rules (after Kata runtime-rs) and the path helpers."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

import kabuto.image
from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor import host
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.plugin import Availability, BasePlugin, check_path, path_allowed, valid_paths_key


class ToyPlugin(BasePlugin):
    default_memory_mib = 256
    min_memory_mib = 128
    max_vcpus = 8
    block_drivers = ("virtio-blk-pci", "virtio-scsi")
    shared_fs_kinds = ("none", "virtio-fs")

    def capabilities(self) -> Capabilities:
        return Capabilities(jailer=False)

    def availability(self, table):
        return Availability(True)

    def backend(self):
        raise NotImplementedError


class ToyWithBinary(ToyPlugin):
    default_binary = "toy-vmm-binary-that-is-not-installed"


@pytest.fixture(autouse=True)
def host_facts(monkeypatch):
    """A host with 4 CPUs and 4 GiB whatever the machine, and no built guest image."""
    monkeypatch.setattr(host, "host_cpus", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=4 << 30))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


@pytest.fixture
def boot(tmp_path) -> dict[str, str]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return {"kernel": str(kernel), "initrd": str(initrd)}


def problems(table: HypervisorConfig, plugin: BasePlugin | None = None) -> dict[str, str]:
    plugin = plugin or ToyPlugin()
    plugin.adjust(table)
    return {p.key: p.reason for p in plugin.validate(table)}


def test_valid_table_after_adjust(boot):
    table = HypervisorConfig(**boot)
    assert problems(table) == {}
    assert table.default_maxvcpus == 4
    assert table.default_memory == 256
    assert table.block_device_driver == "virtio-blk-pci"
    assert table.shared_fs == "none"


@pytest.mark.parametrize("vcpus", [0, -1, -0.5])
def test_vcpus_below_one_is_refused(boot, vcpus):
    assert problems(HypervisorConfig(default_vcpus=vcpus, **boot)) == {"default_vcpus": "must be at least 1"}


def test_fractional_vcpus_count_whole(boot):
    assert problems(HypervisorConfig(default_vcpus=1.5, **boot)) == {}
    found = problems(HypervisorConfig(default_vcpus=2.5, default_maxvcpus=2, **boot))
    assert found == {"default_vcpus": "exceeds default_maxvcpus (2)"}


def test_vcpus_above_maxvcpus(boot):
    assert problems(HypervisorConfig(default_vcpus=3, default_maxvcpus=2, **boot)) == {
        "default_vcpus": "exceeds default_maxvcpus (2)"}


def test_vcpus_above_host_cpus(boot):
    table = HypervisorConfig(default_vcpus=6, default_maxvcpus=16, **boot)
    found = problems(table)
    assert table.default_maxvcpus == 4  # clamped to the host as Kata does
    assert found == {"default_vcpus": "exceeds the host's 4 CPUs"}


def test_negative_maxvcpus(boot):
    found = problems(HypervisorConfig(default_maxvcpus=-2, **boot))
    assert found["default_maxvcpus"] == "must not be negative"


def test_plugin_vcpu_ceiling(monkeypatch, boot):
    monkeypatch.setattr(host, "host_cpus", lambda: 64)
    table = HypervisorConfig(default_maxvcpus=16, **boot)
    assert problems(table) == {"default_maxvcpus": "this hypervisor supports at most 8 vCPUs"}


def test_memory_floor_host_ceiling_and_default(boot):
    assert problems(HypervisorConfig(default_memory=64, **boot)) == {
        "default_memory": "below the minimum of 128 MiB"}
    assert problems(HypervisorConfig(default_memory=8192, **boot)) == {
        "default_memory": "exceeds the host's 4096 MiB of RAM"}
    assert problems(HypervisorConfig(default_memory=512, default_maxmemory=256, **boot)) == {
        "default_maxmemory": "below default_memory"}


@pytest.mark.parametrize(
    ("kernel", "reason"),
    [
        ("boot/vmlinuz", "must be an absolute path"),
        ("/boot/nonexistent-vmlinuz", "does not exist (leave kernel, initrd and image empty to boot"),
        ("/boot/../etc/vmlinuz", "does not match the allowed paths ['/boot/*']"),
    ],
)
def test_kernel_path_rules(boot, kernel, reason):
    table = HypervisorConfig(kernel=kernel, initrd=boot["initrd"], valid_kernel_paths=["/boot/*"])
    assert problems(table)["kernel"].startswith(reason)


def test_configured_path_must_match_its_allow_list(boot, tmp_path):
    table = HypervisorConfig(valid_kernel_paths=["/usr/share/kabuto/*"], **boot)
    assert "does not match" in problems(table)["kernel"]
    table = HypervisorConfig(valid_kernel_paths=[f"{tmp_path}/*"], **boot)
    assert problems(table) == {}


def test_binary_must_be_an_executable_file(boot, tmp_path):
    table = HypervisorConfig(**boot)
    assert problems(table, ToyWithBinary()) == {"path": "does not exist"}
    assert table.path == "/usr/bin/toy-vmm-binary-that-is-not-installed"
    script = tmp_path / "vmm"
    script.write_text("#!/bin/sh\n")
    assert problems(HypervisorConfig(path=str(script), **boot), ToyWithBinary()) == {
        "path": "is not an executable file"}
    script.chmod(0o755)
    assert problems(HypervisorConfig(path=str(script), **boot), ToyWithBinary()) == {}


def test_boot_media_rules(boot):
    found = problems(HypervisorConfig(kernel=boot["kernel"]))
    assert found == {"initrd": "a kernel needs an initrd or an image"}
    both = problems(HypervisorConfig(image=boot["initrd"], **boot))
    assert both == {"image": "set either image or initrd, not both"}
    assert "kabuto image build" in problems(HypervisorConfig())["kernel"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("block_device_driver", "nvdimm"),
        ("shared_fs", "virtio-9p"),
        ("accel", "hvf"),
        ("block_device_aio", "posix"),
        ("virtio_fs_cache", "sometimes"),
        ("vm_rootfs_driver", "ide"),
        ("hugepage_type", "2M"),
        ("log_level", "verbose"),
        ("cold_plug_vfio", "anywhere"),
    ],
)
def test_enumerations(boot, key, value):
    found = problems(HypervisorConfig(**{key: value}, **boot))
    assert list(found) == [key]
    assert found[key].startswith("must be one of ")


def test_kata_spellings_are_adjusted(boot):
    table = HypervisorConfig(virtio_fs_cache="none", cpu_features=" pmu=off , ,vmx=off", **boot)
    assert problems(table) == {}
    assert table.virtio_fs_cache == "never"
    assert table.cpu_features == "pmu=off,vmx=off"


def test_disable_block_device_use_clears_the_driver(boot):
    table = HypervisorConfig(disable_block_device_use=True, block_device_driver="nvdimm", **boot)
    assert problems(table) == {}
    assert table.block_device_driver == ""


def test_virtio_fs_daemon_checked_only_for_virtio_fs(boot):
    assert problems(HypervisorConfig(virtio_fs_daemon="/no/virtiofsd", **boot)) == {}
    found = problems(HypervisorConfig(shared_fs="virtio-fs", virtio_fs_daemon="/no/virtiofsd", **boot))
    assert found == {"virtio_fs_daemon": "does not exist"}


def test_sector_sizes_and_pcie_ports(boot):
    table = HypervisorConfig(block_device_logical_sector_size=4096, block_device_physical_sector_size=1000,
                             pcie_root_port=2, pcie_switch_port=20, **boot)
    plugin = ToyPlugin()
    plugin.adjust(table)
    assert sorted((p.key, p.reason) for p in plugin.validate(table)) == [
        ("block_device_logical_sector_size", "exceeds block_device_physical_sector_size (1000)"),
        ("block_device_physical_sector_size", "must be 0 or a power of two from 512 to 65536"),
        ("pcie_switch_port", "at most 16"),
        ("pcie_switch_port", "set pcie_root_port or pcie_switch_port, not both"),
    ]


def test_jailer_needs_the_capability(boot, tmp_path):
    jailer = tmp_path / "jailer"
    jailer.write_text("#!/bin/sh\n")
    jailer.chmod(0o755)
    found = problems(HypervisorConfig(jailer_path=str(jailer), **boot))
    assert found == {"jailer_path": "this hypervisor has no jailer"}


def test_installed_image_fills_empty_boot_media(monkeypatch, boot):
    image = SimpleNamespace(kernel=Path(boot["kernel"]), initrd=Path(boot["initrd"]))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: image, raising=False)
    table = HypervisorConfig()
    assert problems(table) == {}
    assert (table.kernel, table.initrd) == (boot["kernel"], boot["initrd"])
    other = HypervisorConfig(kernel=boot["kernel"], image=boot["initrd"])
    assert problems(other) == {}
    assert other.initrd == ""  # the table's own choice wins


def test_missing_image_module_leaves_boot_media_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "kabuto.image", types.ModuleType("kabuto.image"))
    table = HypervisorConfig()
    assert "kabuto image build" in problems(table)["kernel"]
    assert table.kernel == ""


def test_path_allowed_semantics():
    assert path_allowed("/anything", [])
    assert path_allowed("/usr/bin/qemu-system-x86_64", ["/usr/bin/qemu-system-*"])
    assert path_allowed("/opt/a/b/c", ["/opt/*"])  # '*' crosses '/' as in Kata's globs
    assert not path_allowed("/usr/bin/../../etc/shadow", ["/usr/bin/*"])
    assert path_allowed("", ["/dev/urandom", ""])
    assert not path_allowed("", ["/dev/urandom"])
    assert valid_paths_key("path") == "valid_hypervisor_paths"
    assert valid_paths_key("kernel_params") is None


def test_check_path_refuses_nul():
    assert check_path("kernel", "/a\0b", [])[0].reason == "contains a NUL character"
