"""A configuration in Kata runtime-rs's layout and key names loads with the right values.

The fixture is written for this test (Kata's key names and table layout, our own values),
with host paths pointing at temporary files so that it validates on any machine.
"""

from __future__ import annotations

import textwrap

import pytest

import kabuto.image
from kabuto.config import loader
from kabuto.hypervisor import resolve_config


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


@pytest.fixture
def kata_file(tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    for name, mode in (("qemu-system-x86_64", 0o755), ("virtiofsd", 0o755), ("vmlinux.container", 0o644),
                       ("kata-containers.img", 0o644)):
        (share / name).write_text("#!/bin/sh\n")
        (share / name).chmod(mode)
    file = tmp_path / "configuration-qemu-runtime-rs.toml"
    file.write_text(textwrap.dedent(f"""\
        # Kata runtime-rs layout: hypervisor, its factory, agent, mem_agent, runtime
        [hypervisor.qemu]
        path = "{share}/qemu-system-x86_64"
        kernel = "{share}/vmlinux.container"
        image = "{share}/kata-containers.img"
        machine_type = "q35"
        rootfs_type = "ext4"
        vm_rootfs_driver = "virtio-pmem"
        rootless = false
        enable_annotations = ["enable_iommu", "kernel_params", "default_vcpus", "default_memory"]
        valid_hypervisor_paths = ["{share}/qemu-system-x86_64"]
        kernel_params = "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"
        firmware = ""
        machine_accelerators = ""
        seccomp_sandbox = "on,obsolete=deny"
        cpu_features = "pmu=off"
        default_vcpus = 1
        overhead_vcpus = 0.25
        default_maxvcpus = 0
        default_bridges = 1
        default_memory = 1024
        overhead_memory = 48
        memory_slots = 12
        default_maxmemory = 0
        memory_offset = 0
        enable_virtio_mem = false
        disable_block_device_use = false
        # Kata's template says virtio-fs; no virtiofsd runs here, so this file opts out
        shared_fs = "none"
        virtio_fs_daemon = "{share}/virtiofsd"
        valid_virtio_fs_daemon_paths = ["{share}/virtiofsd"]
        virtio_fs_cache_size = 0
        virtio_fs_queue_size = 512
        virtio_fs_extra_args = ["--thread-pool-size=2"]
        virtio_fs_cache = "auto"
        block_device_driver = "virtio-scsi"
        block_device_aio = "io_uring"
        block_device_logical_sector_size = 512
        block_device_physical_sector_size = 4096
        queue_size = 128
        num_queues = 1
        enable_iommu = false
        pflashes = []
        extra_monitor_socket = ""
        cold_plug_vfio = "no-port"
        pcie_root_port = 0
        pcie_switch_port = 0
        entropy_source = "/dev/urandom"
        valid_entropy_sources = ["/dev/urandom", "/dev/random", ""]
        tdx_quote_generation_service_socket_port = 0
        network_queues = 1
        disable_guest_selinux = true

        [hypervisor.qemu.factory]
        enable_template = false
        template_path = "/run/vc/vm/template"

        [agent.kata]
        enable_debug = true
        kernel_modules = ["e1000e InterruptThrottleRate=3000,3000,3000 EEE=1"]
        dial_timeout_ms = 20
        reconnect_timeout_ms = 4000
        create_container_timeout = 45

        [agent.kata.mem_agent]
        mem_agent_enable = true
        memcg_swappiness_max = 40
        compact_force_times = 9223372036854775807

        [runtime]
        name = "virt_container"
        hypervisor_name = "qemu"
        agent_name = "kata"
        internetworking_model = "tcfilter"
        disable_guest_seccomp = true
        sandbox_cgroup_only = true
        static_sandbox_resource_mgmt = true
        sandbox_bind_mounts = []
        vfio_mode = "guest-kernel"
        emptydir_mode = "shared-fs"
        experimental = []
        dan_conf = "/run/kata-containers/dans"
        """))
    return file, share


def test_kata_runtime_rs_qemu_file_loads_with_its_values(kata_file):
    file, share = kata_file
    config = resolve_config(file).config
    # every key is one Kabuto knows; the ones it does not apply are named, once each
    not_applied = "parsed, not applied by Kabuto"
    assert config.warnings == [
        f'hypervisor.qemu.vm_rootfs_driver = "virtio-pmem": {not_applied}',
        f'hypervisor.qemu.rootfs_type = "ext4": {not_applied}',
        f"hypervisor.qemu.overhead_vcpus = 0.25: {not_applied}",
        f"hypervisor.qemu.overhead_memory = 48: {not_applied}",
        f"hypervisor.qemu.block_device_logical_sector_size = 512: {not_applied}",
        f"hypervisor.qemu.block_device_physical_sector_size = 4096: {not_applied}",
        f"hypervisor.qemu.queue_size = 128: {not_applied}",
        f"hypervisor.qemu.num_queues = 1: {not_applied}",
        f'hypervisor.qemu.cold_plug_vfio = "no-port": {not_applied}',
        f"hypervisor.qemu.tdx_quote_generation_service_socket_port = 0: {not_applied}",
        f'agent.kata.kernel_modules = ["e1000e InterruptThrottleRate=3000,3000,3000 EEE=1"]: {not_applied}',
        f"agent.kata.create_container_timeout = 45: {not_applied}",
        f"agent.kata.mem_agent.mem_agent_enable = true: {not_applied}",
        f"agent.kata.mem_agent.memcg_swappiness_max = 40: {not_applied}",
        f"agent.kata.mem_agent.compact_force_times = 9223372036854775807: {not_applied}",
        f"runtime.sandbox_cgroup_only = true: {not_applied}",
        f"runtime.static_sandbox_resource_mgmt = true: {not_applied}",
        f'runtime.dan_conf = "/run/kata-containers/dans": {not_applied}',
    ]
    qemu = config.active_hypervisor
    assert config.hypervisor_name == "qemu"
    assert qemu.path == f"{share}/qemu-system-x86_64"
    assert (qemu.kernel, qemu.image, qemu.initrd) == (f"{share}/vmlinux.container",
                                                      f"{share}/kata-containers.img", "")
    assert (qemu.machine_type, qemu.vm_rootfs_driver, qemu.rootfs_type) == ("q35", "virtio-pmem", "ext4")
    # [agent.kata] enable_debug = true: the agent logs at DEBUG
    assert qemu.kernel_params == "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 agent_log_level=DEBUG"
    assert (qemu.default_vcpus, qemu.overhead_vcpus, qemu.default_memory, qemu.overhead_memory) == (
        1, 0.25, 1024, 48)
    assert qemu.default_maxvcpus >= 1  # 0 means the host's CPUs, as in Kata
    assert qemu.memory_slots == 12
    assert (qemu.shared_fs, qemu.virtio_fs_daemon, qemu.virtio_fs_cache) == (
        "none", f"{share}/virtiofsd", "auto")
    assert qemu.virtio_fs_extra_args == ["--thread-pool-size=2"]
    assert (qemu.block_device_driver, qemu.block_device_aio) == ("virtio-scsi", "io_uring")
    assert qemu.seccomp_sandbox == "on,obsolete=deny"
    assert qemu.enable_annotations == ["enable_iommu", "kernel_params", "default_vcpus", "default_memory"]
    assert qemu.factory.template_path == "/run/vc/vm/template"
    agent = config.active_agent
    assert agent.enable_debug is True
    assert (agent.dial_timeout_ms, agent.reconnect_timeout_ms) == (20, 4000)
    assert agent.create_container_timeout == 45
    assert agent.mem_agent.mem_agent_enable is True
    assert agent.mem_agent.memcg_swappiness_max == 40
    assert agent.mem_agent.compact_force_times == 2**63 - 1
    assert config.runtime.static_sandbox_resource_mgmt is True
    assert config.runtime.dan_conf == "/run/kata-containers/dans"


def test_kata_annotations_and_allow_lists_apply(kata_file):
    file, _share = kata_file
    prefix = "io.katacontainers.config.hypervisor."
    config = resolve_config(file, {prefix + "kernel_params": "systemd.unified_cgroup_hierarchy=0",
                                prefix + "default_memory": "2Gi"}).config
    assert config.active_hypervisor.kernel_params == (
        "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=0 agent_log_level=DEBUG")
    assert config.active_hypervisor.default_memory == 2048


def test_go_runtime_spellings_are_accepted(kata_file):
    file, _share = kata_file
    text = file.read_text().replace('seccomp_sandbox = "on,obsolete=deny"', 'seccompsandbox = "on"')
    text = text.replace('extra_monitor_socket = ""', 'dbg_monitor_socket = "qmp"')
    file.write_text(text)
    qemu = resolve_config(file).config.active_hypervisor
    assert (qemu.seccomp_sandbox, qemu.extra_monitor_socket) == ("on", "qmp")


def test_host_paths_of_another_machine_are_reported(kata_file):
    file, share = kata_file
    file.write_text(file.read_text().replace(f"{share}/vmlinux.container", "/usr/share/kata/vmlinux.none"))
    with pytest.raises(loader.ConfigError) as caught:
        resolve_config(file)
    assert [p.key for p in caught.value.problems] == ["hypervisor.qemu.kernel"]
    assert caught.value.problems[0].reason.startswith("does not exist (leave kernel, initrd and image empty")
