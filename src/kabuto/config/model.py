"""Configuration model, key-compatible with Kata runtime-rs's configuration.toml.

Tables stay flat as in Kata's files; unknown keys are kept (``extra="allow"``) so that a
newer Kata file still loads, and the loader reports them as warnings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Table(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)

    def unknown_keys(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class HypervisorConfig(_Table):
    """One ``[hypervisor.<name>]`` table."""

    # boot
    path: str = ""
    ctlpath: str = ""
    jailer_path: str = ""
    kernel: str = ""
    image: str = ""
    initrd: str = ""
    kernel_params: str = ""
    firmware: str = ""
    firmware_volume: str = ""
    machine_type: str = ""
    machine_accelerators: str = ""
    accel: str = "auto"
    cpu_features: str = ""
    vm_rootfs_driver: str = ""
    rootfs_type: str = ""
    # cpu and memory
    default_vcpus: float = 1
    default_maxvcpus: int = 0
    default_memory: int = 0
    default_maxmemory: int = 0
    memory_slots: int = 10
    memory_offset: int = 0
    default_bridges: int = 1
    enable_virtio_mem: bool = False
    enable_mem_prealloc: bool = False
    enable_hugepages: bool = False
    file_mem_backend: str = ""
    reclaim_guest_freed_memory: bool = False
    # devices
    disable_block_device_use: bool = False
    block_device_driver: str = ""
    block_device_aio: str = ""
    block_device_cache_set: bool = False
    block_device_cache_direct: bool = False
    block_device_cache_noflush: bool = False
    enable_iothreads: bool = False
    enable_vhost_user_store: bool = False
    vhost_user_store_path: str = ""
    hotplug_vfio_on_root_bus: bool = False
    pcie_root_port: int = 0
    disable_vhost_net: bool = False
    entropy_source: str = "/dev/urandom"
    pflashes: list[str] = Field(default_factory=list)
    disable_image_nvdimm: bool = False
    # shared filesystem
    shared_fs: str = ""
    virtio_fs_daemon: str = ""
    virtio_fs_cache_size: int = 0
    virtio_fs_queue_size: int = 1024
    virtio_fs_cache: str = "never"
    virtio_fs_extra_args: list[str] = Field(default_factory=list)
    msize_9p: int = 8192
    # network
    rx_rate_limiter_max_rate: int = 0
    tx_rate_limiter_max_rate: int = 0
    # security and annotations
    enable_annotations: list[str] = Field(default_factory=list)
    valid_hypervisor_paths: list[str] = Field(default_factory=list)
    valid_ctlpaths: list[str] = Field(default_factory=list)
    valid_jailer_paths: list[str] = Field(default_factory=list)
    valid_virtio_fs_daemon_paths: list[str] = Field(default_factory=list)
    valid_vhost_user_store_paths: list[str] = Field(default_factory=list)
    valid_file_mem_backends: list[str] = Field(default_factory=list)
    valid_entropy_sources: list[str] = Field(default_factory=list)
    valid_kernel_paths: list[str] = Field(default_factory=list)
    valid_image_paths: list[str] = Field(default_factory=list)
    valid_initrd_paths: list[str] = Field(default_factory=list)
    guest_hook_path: str = ""
    seccompsandbox: str = ""
    rootless: bool = False
    disable_seccomp: bool = False
    disable_selinux: bool = False
    disable_guest_selinux: bool = True
    confidential_guest: bool = False
    # debug
    enable_debug: bool = False
    debug_console_enabled: bool = False
    use_legacy_serial: bool = False
    guest_memory_dump_path: str = ""
    guest_memory_dump_paging: bool = False
    disable_nesting_checks: bool = False


class AgentConfig(_Table):
    """The ``[agent.kata]`` table."""

    enable_debug: bool = False
    enable_tracing: bool = False
    debug_console_enabled: bool = False
    kernel_modules: list[str] = Field(default_factory=list)
    container_pipe_size: int = 0
    dial_timeout: int = 45
    reconnect_timeout_ms: int = 3000
    request_timeout_ms: int = 30000
    health_check_request_timeout_ms: int = 90000
    mem_agent_enable: bool = False


class RuntimeConfig(_Table):
    """The ``[runtime]`` table."""

    name: str = "virt_container"
    hypervisor_name: str = "qemu"
    agent_name: str = "kata"
    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    disable_guest_seccomp: bool = True
    disable_new_netns: bool = False
    sandbox_cgroup_only: bool = False
    static_sandbox_resource_mgmt: bool = False
    enable_pprof: bool = False
    vfio_mode: str = "guest-kernel"
    experimental: list[str] = Field(default_factory=list)
    create_container_timeout: int = 60


class FactoryConfig(_Table):
    """The ``[factory]`` table (VM templating and caching)."""

    enable_template: bool = False
    template_path: str = "/run/vc/vm/template"
    vm_cache_number: int = 0
    vm_cache_endpoint: str = "/var/run/kata-containers/cache.sock"


class KabutoConfig(BaseModel):
    """The whole resolved configuration."""

    model_config = ConfigDict(extra="allow")

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    hypervisor: dict[str, HypervisorConfig] = Field(default_factory=dict)
    agent: dict[str, AgentConfig] = Field(default_factory=dict)
    factory: FactoryConfig = Field(default_factory=FactoryConfig)
    # where it came from, and the non-fatal findings (unknown keys ...)
    source: str = Field(default="<built-in>", exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)

    @property
    def hypervisor_name(self) -> str:
        return self.runtime.hypervisor_name

    @property
    def active_hypervisor(self) -> HypervisorConfig:
        """The ``[hypervisor.<runtime.hypervisor_name>]`` table (after alias resolution)."""
        return self.hypervisor[self.runtime.hypervisor_name]

    @property
    def active_agent(self) -> AgentConfig:
        return self.agent.get(self.runtime.agent_name) or AgentConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
