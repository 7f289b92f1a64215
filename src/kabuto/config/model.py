"""Configuration model, key-compatible with Kata runtime-rs's configuration.toml.

Tables stay flat as in Kata's files; unknown keys are kept (``extra="allow"``) so that a
newer Kata file still loads, and the loader reports them as warnings. The loader validates
TOML input strictly (a string where a number belongs is an error, not a conversion);
assignments from code stay lax.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class _Table(BaseModel):
    model_config = ConfigDict(
        extra="allow", validate_assignment=True, populate_by_name=True, allow_inf_nan=False
    )

    def unknown_keys(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class HypervisorFactoryConfig(_Table):
    """``[hypervisor.<name>.factory]``: VM templating (runtime-rs keeps it per hypervisor)."""

    enable_template: bool = False
    template_path: str = "/run/vc/vm/template"


class RootlessUser(_Table):
    """``[hypervisor.<name>.rootless_user]``."""

    uid: int = 0
    gid: int = 0
    groups: list[int] = Field(default_factory=list)
    user_name: str = ""


class GuestExtensionImage(_Table):
    """One ``[[hypervisor.<name>.guest_extension_images]]`` entry."""

    name: str
    path: str = ""
    verity_params: str = ""


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
    kernel_verity_params: str = ""
    firmware: str = ""
    firmware_volume: str = ""
    machine_type: str = ""
    machine_accelerators: str = ""
    #: Kabuto extension: "auto" uses KVM only where it runs ordinary guests, else TCG
    accel: str = "auto"
    #: Kabuto extension: MiB of QEMU's TCG translation cache (-accel tcg,tb-size=N; 0 is QEMU's own
    #: default, 1 GiB in 7.2); the cache fills as the guest runs new code and stays resident, so it
    #: is most of a TCG QEMU's memory beyond the guest's (docs/benchmarks.md). No effect under KVM.
    #: QEMU 7.2 aborts a vCPU hot-add once a small cache's regions are all taken (docs/qemu.md), so
    #: the default is QEMU's own.
    tcg_tb_size: int = 0
    cpu_features: str = ""
    vm_rootfs_driver: str = ""
    rootfs_type: str = ""
    prefetch_list_path: str = ""
    guest_extension_images: list[GuestExtensionImage] = Field(default_factory=list)
    # cpu and memory
    default_vcpus: float = 1
    overhead_vcpus: float = 0
    default_maxvcpus: int = 0
    #: MiB; 0 means "the plugin's default" as in Kata
    default_memory: int = 0
    overhead_memory: int = 0
    default_maxmemory: int = 0
    memory_slots: int = 10
    memory_offset: int = 0
    default_bridges: int = 1
    enable_virtio_mem: bool = False
    enable_mem_prealloc: bool = False
    enable_hugepages: bool = False
    hugepage_type: str = "hugetlbfs"
    file_mem_backend: str = ""
    reclaim_guest_freed_memory: bool = False
    enable_guest_swap: bool = False
    guest_swap_path: str = "/run/kata-containers/swap"
    guest_swap_size_percent: int = 100
    guest_swap_create_threshold_secs: int = 60
    #: no backend turns nesting off, so false is what Kabuto does
    disable_nested_virtualization: bool = False
    # devices
    disable_block_device_use: bool = False
    block_device_driver: str = ""
    block_device_aio: str = ""
    block_device_cache_set: bool = False
    block_device_cache_direct: bool = False
    block_device_cache_noflush: bool = False
    block_device_logical_sector_size: int = 0
    block_device_physical_sector_size: int = 0
    disk_rate_limiter_bw_max_rate: int = 0
    disk_rate_limiter_ops_max_rate: int = 0
    disk_rate_limiter_bw_one_time_burst: int | None = None
    disk_rate_limiter_ops_one_time_burst: int | None = None
    queue_size: int = 0
    num_queues: int = 0
    enable_iothreads: bool = False
    indep_iothreads: int = 0
    enable_vhost_user_store: bool = False
    vhost_user_store_path: str = ""
    hotplug_vfio_on_root_bus: bool = False
    #: Kabuto cold-plugs no VFIO device: "no-port" is what it does
    cold_plug_vfio: str = "no-port"
    pcie_root_port: int = 0
    pcie_switch_port: int = 0
    enable_iommu: bool = False
    enable_iommu_platform: bool = False
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
    virtio_fs_is_dax: bool = False
    virtio_fs_extra_args: list[str] = Field(default_factory=list)
    msize_9p: int = 8192
    # network
    rx_rate_limiter_max_rate: int = 0
    tx_rate_limiter_max_rate: int = 0
    network_queues: int = 0
    # security and annotations
    #: regular expressions naming the annotation keys a pod may set (see docs/configuration.md)
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
    valid_firmware_paths: list[str] = Field(default_factory=list)
    guest_hook_path: str = ""
    # runtime-rs spells it seccomp_sandbox, the Go runtime seccompsandbox
    seccomp_sandbox: str = Field(
        default="", validation_alias=AliasChoices("seccomp_sandbox", "seccompsandbox")
    )
    selinux_label: str = ""
    rootless: bool = False
    rootless_user: RootlessUser | None = None
    disable_seccomp: bool = False
    disable_selinux: bool = False
    disable_guest_selinux: bool = True
    confidential_guest: bool = False
    sev_snp_guest: bool = False
    snp_id_block: str = ""
    snp_id_auth: str = ""
    snp_guest_policy: int = 0x30000
    initdata: str = ""
    tdx_quote_generation_service_socket_port: int = 4050
    # debug
    enable_debug: bool = False
    log_level: str = "info"
    extra_monitor_socket: str = Field(
        default="", validation_alias=AliasChoices("extra_monitor_socket", "dbg_monitor_socket")
    )
    debug_console_enabled: bool = False
    use_legacy_serial: bool = False
    guest_memory_dump_path: str = ""
    guest_memory_dump_paging: bool = False
    disable_nesting_checks: bool = False
    # remote hypervisor and VM templating (accepted for compatibility)
    hypervisor_socket: str = ""
    hypervisor_timeout: int = 0
    default_gpus: int = 0
    default_gpu_model: str = ""
    boot_to_be_template: bool = False
    boot_from_template: bool = False
    memory_path: str = ""
    device_state_path: str = ""
    factory: HypervisorFactoryConfig = Field(default_factory=HypervisorFactoryConfig)


class MemAgentConfig(_Table):
    """``[agent.kata.mem_agent]``: the guest memory agent (unset keys keep the agent's defaults)."""

    mem_agent_enable: bool = Field(default=False, validation_alias=AliasChoices("mem_agent_enable", "enable"))
    memcg_disable: bool | None = None
    memcg_swap: bool | None = None
    memcg_swappiness_max: int | None = None
    memcg_period_secs: int | None = None
    memcg_period_psi_percent_limit: int | None = None
    memcg_eviction_psi_percent_limit: int | None = None
    memcg_eviction_run_aging_count_min: int | None = None
    compact_disable: bool | None = None
    compact_period_secs: int | None = None
    compact_period_psi_percent_limit: int | None = None
    compact_psi_percent_limit: int | None = None
    compact_sec_max: int | None = None
    compact_order: int | None = None
    compact_threshold: int | None = None
    compact_force_times: int | None = None


class AgentConfig(_Table):
    """The ``[agent.kata]`` table."""

    enable_debug: bool = False
    log_level: str = "info"
    enable_tracing: bool = False
    debug_console_enabled: bool = False
    visible_cdi_devices: bool = False
    kernel_modules: list[str] = Field(default_factory=list)
    container_pipe_size: int = 0
    server_port: int = 1024
    log_port: int = 1025
    passfd_listener_port: int = 1027
    #: Go runtime key (seconds); runtime-rs uses dial_timeout_ms / reconnect_timeout_ms
    dial_timeout: int = 45
    dial_timeout_ms: int = 10
    reconnect_timeout_ms: int = 3000
    request_timeout_ms: int = 30000
    #: seconds, as in Kata's file
    create_container_timeout: int = 30
    health_check_request_timeout_ms: int = 90000
    cdh_api_timeout_ms: int = 50000
    launch_process_timeout: int = 0
    policy: str = ""
    mem_agent: MemAgentConfig = Field(default_factory=MemAgentConfig)


class SharedMount(_Table):
    """One ``[[runtime.shared_mounts]]`` entry."""

    name: str
    src_ctr: str
    src_path: str
    dst_ctr: str
    dst_path: str


class RuntimeConfig(_Table):
    """The ``[runtime]`` table."""

    name: str = "virt_container"
    hypervisor_name: str = "qemu"
    agent_name: str = "kata"
    enable_debug: bool = False
    log_level: str = "info"
    internetworking_model: str = "tcfilter"
    disable_guest_seccomp: bool = True
    disable_new_netns: bool = False
    sandbox_cgroup_only: bool = False
    sandbox_bind_mounts: list[str] = Field(default_factory=list)
    static_sandbox_resource_mgmt: bool = False
    enable_vcpus_pinning: bool = False
    enable_tracing: bool = False
    jaeger_endpoint: str = ""
    jaeger_user: str = ""
    jaeger_password: str = ""
    enable_pprof: bool = False
    vfio_mode: str = "guest-kernel"
    emptydir_mode: str = "shared-fs"
    experimental: list[str] = Field(default_factory=list)
    keep_abnormal: bool = False
    dan_conf: str = ""
    shared_mounts: list[SharedMount] = Field(default_factory=list)
    use_passfd_io: bool = False
    passfd_listener_port: int = 1027
    pod_resource_api_sock: str = ""
    kubelet_root_dir: str = ""
    #: seconds (Kabuto's own; Kata keeps it in [agent.kata])
    create_container_timeout: int = 60


class FactoryConfig(_Table):
    """The top-level ``[factory]`` table of the Go runtime (VM templating and caching)."""

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
    dropins: list[str] = Field(default_factory=list, exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)
    #: config key path -> the annotation that set it, so that a later problem can name it
    annotated: dict[str, str] = Field(default_factory=dict, exclude=True)

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

    def to_toml(self) -> str:
        """TOML text that loads back to this configuration (kept keys with inf or dates too)."""
        import tomli_w

        return tomli_w.dumps(self.model_dump(mode="python", exclude_none=True))
