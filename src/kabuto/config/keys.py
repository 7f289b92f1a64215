"""What Kabuto does with every configuration key: applied (and where), warned, or refused.

No key is a silent no-op. A key Kabuto does not act on is ``WARNED``: a value other than the
model's default gives one warning per key at load (``config.warnings``), so an untouched
built-in default stays quiet while a Kata file that sets such a key is told so. A key whose
value Kabuto cannot honour without weakening what the operator asked for (a confidential
guest, a rootless VMM, an agent policy) is ``Refused``: a value other than the default is a
problem naming the key. An ``Applied`` key names the modules that read it, which
tests/unit/test_config_coverage.py checks, and, when only some built-in backends apply it,
which ones: under another built-in backend a set value warns as well.

kabuto.config.coverage renders this registry as the table in docs/configuration.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from kabuto.config.model import AgentConfig, FactoryConfig, HypervisorConfig, KabutoConfig, RuntimeConfig
from kabuto.errors import Problem

QEMU, CLH, FC, DB = "qemu", "cloud-hypervisor", "firecracker", "dragonball"
#: the backends Kabuto ships; a third-party plugin's own use of keys is unknown here
BUILTIN_BACKENDS = frozenset({QEMU, CLH, FC, DB})
#: keys whose value a warning must not repeat
SECRET_KEYS = frozenset({"runtime.jaeger_password"})
MAX_SHOWN_VALUE = 80


@dataclass(frozen=True)
class Applied:
    """Read outside the parsing: ``where`` for the docs, ``reads`` the modules (under src/kabuto)
    that read it; ``backends``: the built-in backends that apply it (or whose plugin refuses a set
    value), None for all."""

    where: str
    reads: tuple[str, ...]
    backends: frozenset[str] | None = None


@dataclass(frozen=True)
class Refused:
    """A value other than the default is an error; ``why`` says what would go wrong."""

    why: str


class _Warned:
    def __repr__(self) -> str:
        return "WARNED"


#: parsed, not applied by Kabuto (a set value warns)
WARNED = _Warned()
Coverage = Applied | Refused | _Warned

_ALL_BACKENDS = ("hypervisor/qemu/cmdline.py", "hypervisor/cloud_hypervisor/backend.py",
                 "hypervisor/firecracker/backend.py", "hypervisor/dragonball/backend.py")
_PATH_RULES = Applied("path rules: annotations and plugin validate", ("config/rules.py",))


def _qemu(where: str, *reads: str) -> Applied:
    return Applied(f"qemu {where}", reads or ("hypervisor/qemu/cmdline.py",), frozenset({QEMU}))


def _clh(where: str) -> Applied:
    return Applied(f"cloud-hypervisor {where}", ("hypervisor/cloud_hypervisor/backend.py",), frozenset({CLH}))


#: a key that only tunes what another key of its table turns on (key -> that switch): while the
#: switch is off the key does nothing, in Kata as in Kabuto, so its value is no news; the switch
#: itself warns when it is turned on (every stock Kata file sets a mem_agent table, disabled)
SWITCHED_BY: dict[str, str] = {
    **{f"agent.mem_agent.{key}": "mem_agent_enable" for key in (
        "memcg_disable", "memcg_swap", "memcg_swappiness_max", "memcg_period_secs",
        "memcg_period_psi_percent_limit", "memcg_eviction_psi_percent_limit",
        "memcg_eviction_run_aging_count_min", "compact_disable", "compact_period_secs",
        "compact_period_psi_percent_limit", "compact_psi_percent_limit", "compact_sec_max", "compact_order",
        "compact_threshold", "compact_force_times",
    )},
    # they say how to attach an image; Kabuto boots its own initrd when image is empty
    "hypervisor.vm_rootfs_driver": "image",
    "hypervisor.rootfs_type": "image",
    "hypervisor.vhost_user_store_path": "enable_vhost_user_store",
    "hypervisor.guest_swap_path": "enable_guest_swap",
    "hypervisor.guest_swap_size_percent": "enable_guest_swap",
    "hypervisor.guest_swap_create_threshold_secs": "enable_guest_swap",
    "hypervisor.disk_rate_limiter_bw_one_time_burst": "disk_rate_limiter_bw_max_rate",
    "hypervisor.disk_rate_limiter_ops_one_time_burst": "disk_rate_limiter_ops_max_rate",
    "hypervisor.tdx_quote_generation_service_socket_port": "confidential_guest",
    "runtime.jaeger_endpoint": "enable_tracing",
    "runtime.jaeger_user": "enable_tracing",
    "runtime.jaeger_password": "enable_tracing",
    "runtime.passfd_listener_port": "use_passfd_io",
}

#: ``<table kind>.<key>`` (nested tables dotted: ``hypervisor.factory.enable_template``) -> coverage
REGISTRY: dict[str, Coverage] = {
    # [hypervisor.<name>]: boot
    "hypervisor.path": Applied("all backends: the VMM binary (dragonball: refused by its plugin)",
                               ("hypervisor/qemu/cmdline.py", "hypervisor/cloud_hypervisor/backend.py",
                                "hypervisor/firecracker/backend.py")),
    "hypervisor.ctlpath": WARNED,
    "hypervisor.jailer_path": Applied("firecracker: the jailer (plugins without one refuse it)",
                                      ("hypervisor/firecracker/backend.py", "hypervisor/plugin.py")),
    "hypervisor.kernel": Applied("all backends", _ALL_BACKENDS),
    "hypervisor.image": Applied("all backends", ("hypervisor/qemu/cmdline.py", "hypervisor/rest_vmm.py",
                                                 "hypervisor/dragonball/backend.py")),
    "hypervisor.initrd": Applied("all backends", _ALL_BACKENDS),
    "hypervisor.kernel_params": Applied("all backends", ("hypervisor/qemu/cmdline.py",
                                                         "hypervisor/rest_vmm.py",
                                                         "hypervisor/dragonball/backend.py")),
    "hypervisor.kernel_verity_params": WARNED,
    "hypervisor.firmware": Applied("qemu cmdline (-bios), cloud-hypervisor (dragonball: refused)",
                                   ("hypervisor/qemu/cmdline.py", "hypervisor/cloud_hypervisor/backend.py"),
                                   frozenset({QEMU, CLH, DB})),
    "hypervisor.firmware_volume": WARNED,
    "hypervisor.machine_type": Applied("qemu cmdline and hot-plug (dragonball: refused)",
                                       ("hypervisor/qemu/cmdline.py", "hypervisor/qemu/hotplug.py"),
                                       frozenset({QEMU, DB})),
    "hypervisor.machine_accelerators": _qemu("cmdline (-machine)"),
    "hypervisor.accel": _qemu("backend (accelerator choice)", "hypervisor/qemu/backend.py"),
    "hypervisor.tcg_tb_size": _qemu("cmdline (-accel tcg,tb-size: TCG only; a value set under KVM warns)",
                                    "hypervisor/qemu/cmdline.py", "hypervisor/qemu/backend.py"),
    "hypervisor.cpu_features": _qemu("cmdline (-cpu)"),
    "hypervisor.vm_rootfs_driver": WARNED,
    "hypervisor.rootfs_type": WARNED,
    "hypervisor.prefetch_list_path": WARNED,
    "hypervisor.guest_extension_images": WARNED,
    # cpu and memory
    "hypervisor.default_vcpus": Applied("all backends", _ALL_BACKENDS),
    "hypervisor.overhead_vcpus": WARNED,
    "hypervisor.default_maxvcpus": Applied(
        "qemu cmdline (-smp maxcpus), cloud-hypervisor, dragonball",
        ("hypervisor/qemu/cmdline.py", "hypervisor/cloud_hypervisor/backend.py",
         "hypervisor/dragonball/backend.py"), frozenset({QEMU, CLH, DB})),
    "hypervisor.default_memory": Applied("all backends", _ALL_BACKENDS),
    "hypervisor.overhead_memory": WARNED,
    "hypervisor.default_maxmemory": _qemu("cmdline (-m maxmem: memory hot-plug headroom); the ceiling a "
                                          "pod's VM grows to, and refuses beyond",
                                          "hypervisor/qemu/cmdline.py", "hypervisor/qemu/resize.py",
                                          "runtime/sandbox.py"),
    "hypervisor.memory_slots": _qemu("cmdline (-m slots, with default_maxmemory); DIMMs resize_memory adds",
                                     "hypervisor/qemu/cmdline.py", "hypervisor/qemu/plugin.py",
                                     "hypervisor/qemu/resize.py"),
    "hypervisor.memory_offset": WARNED,
    "hypervisor.default_bridges": WARNED,
    "hypervisor.enable_virtio_mem": WARNED,
    "hypervisor.enable_mem_prealloc": WARNED,
    "hypervisor.enable_hugepages": _clh("(hugepages memory)"),
    "hypervisor.hugepage_type": WARNED,
    "hypervisor.file_mem_backend": _qemu("guest RAM on memory-backend-file at this path, shared"),
    "hypervisor.reclaim_guest_freed_memory": WARNED,
    "hypervisor.enable_guest_swap": WARNED,
    "hypervisor.guest_swap_path": WARNED,
    "hypervisor.guest_swap_size_percent": WARNED,
    "hypervisor.guest_swap_create_threshold_secs": WARNED,
    "hypervisor.disable_nested_virtualization": WARNED,
    # devices
    # the plugin clears block_device_driver; the configured capabilities have no block hot-plug
    "hypervisor.disable_block_device_use": Applied("capabilities: no block hot-plug",
                                                   ("hypervisor/capabilities.py",)),
    "hypervisor.block_device_driver": Applied("qemu cmdline and hot-plug (virtio-blk or virtio-scsi); the "
                                              "other backends have one virtio-blk transport and their "
                                              "plugins accept only its names",
                                              ("hypervisor/qemu/cmdline.py", "hypervisor/qemu/hotplug.py",
                                               "hypervisor/plugin.py")),
    "hypervisor.block_device_aio": _qemu("cmdline and hot-plug (the disk file node's aio)"),
    "hypervisor.block_device_cache_set": _qemu("cmdline and hot-plug (the disk file node's cache)"),
    "hypervisor.block_device_cache_direct": _qemu("cmdline and hot-plug (cache.direct, with "
                                                  "block_device_cache_set)"),
    "hypervisor.block_device_cache_noflush": _qemu("cmdline and hot-plug (cache.no-flush, with "
                                                   "block_device_cache_set)"),
    "hypervisor.block_device_logical_sector_size": WARNED,
    "hypervisor.block_device_physical_sector_size": WARNED,
    "hypervisor.disk_rate_limiter_bw_max_rate": WARNED,
    "hypervisor.disk_rate_limiter_ops_max_rate": WARNED,
    "hypervisor.disk_rate_limiter_bw_one_time_burst": WARNED,
    "hypervisor.disk_rate_limiter_ops_one_time_burst": WARNED,
    # as in Kata runtime-rs, whose QEMU driver does not use them either
    "hypervisor.queue_size": _clh("(every disk's queue_size)"),
    "hypervisor.num_queues": _clh("(every disk's num_queues)"),
    "hypervisor.enable_iothreads": _qemu("cmdline and hot-plug (an iothread for virtio-blk disks or the "
                                         "virtio-scsi controller)"),
    "hypervisor.indep_iothreads": WARNED,
    "hypervisor.enable_vhost_user_store": WARNED,
    "hypervisor.vhost_user_store_path": WARNED,
    "hypervisor.hotplug_vfio_on_root_bus": WARNED,
    "hypervisor.cold_plug_vfio": WARNED,
    "hypervisor.pcie_root_port": Applied("qemu cmdline (hot-plug root ports; dragonball: refused)",
                                         ("hypervisor/qemu/cmdline.py",), frozenset({QEMU, DB})),
    "hypervisor.pcie_switch_port": WARNED,
    "hypervisor.enable_iommu": WARNED,
    "hypervisor.enable_iommu_platform": WARNED,
    "hypervisor.disable_vhost_net": _qemu("cmdline (tap vhost)"),
    "hypervisor.entropy_source": _clh("(rng)"),
    "hypervisor.pflashes": WARNED,
    "hypervisor.disable_image_nvdimm": WARNED,
    # shared filesystem
    "hypervisor.shared_fs": Applied("each plugin accepts only its backend's kinds; the configured "
                                    "capabilities share the rootfs by it (none: as a block device)",
                                    ("hypervisor/plugin.py", "hypervisor/capabilities.py",
                                     "hypervisor/cloud_hypervisor/backend.py")),
    "hypervisor.virtio_fs_daemon": Applied("the virtiofsd binary (qemu: found when empty)",
                                           ("hypervisor/virtiofsd.py", "hypervisor/qemu/plugin.py"),
                                           frozenset({QEMU, CLH})),
    "hypervisor.virtio_fs_cache_size": WARNED,
    "hypervisor.virtio_fs_queue_size": Applied("the virtio-fs queue size",
                                               ("hypervisor/qemu/cmdline.py",
                                                "hypervisor/cloud_hypervisor/backend.py"),
                                               frozenset({QEMU, CLH})),
    "hypervisor.virtio_fs_cache": Applied("virtiofsd's cache mode", ("hypervisor/virtiofsd.py",),
                                          frozenset({QEMU, CLH})),
    "hypervisor.virtio_fs_is_dax": WARNED,
    "hypervisor.virtio_fs_extra_args": Applied("virtiofsd's extra arguments", ("hypervisor/virtiofsd.py",),
                                               frozenset({QEMU, CLH})),
    "hypervisor.msize_9p": Applied("runtime: the 9p share's msize mount option in the guest",
                                   ("runtime/sandbox.py", "hypervisor/plugin.py")),
    # network
    "hypervisor.rx_rate_limiter_max_rate": WARNED,
    "hypervisor.tx_rate_limiter_max_rate": WARNED,
    "hypervisor.network_queues": Applied("runtime: multi-queue taps; qemu netdev queues + virtio-net mq, "
                                         "cloud-hypervisor num_queues (firecracker: refused above 1)",
                                         ("runtime/sandbox.py", "hypervisor/plugin.py")),
    # security and annotations
    "hypervisor.enable_annotations": Applied("annotations", ("config/annotations.py",)),
    "hypervisor.valid_hypervisor_paths": _PATH_RULES,
    "hypervisor.valid_ctlpaths": _PATH_RULES,
    "hypervisor.valid_jailer_paths": _PATH_RULES,
    "hypervisor.valid_virtio_fs_daemon_paths": _PATH_RULES,
    "hypervisor.valid_vhost_user_store_paths": _PATH_RULES,
    "hypervisor.valid_file_mem_backends": _PATH_RULES,
    "hypervisor.valid_entropy_sources": _PATH_RULES,
    "hypervisor.valid_kernel_paths": _PATH_RULES,
    "hypervisor.valid_image_paths": _PATH_RULES,
    "hypervisor.valid_initrd_paths": _PATH_RULES,
    "hypervisor.valid_firmware_paths": _PATH_RULES,
    "hypervisor.guest_hook_path": WARNED,
    "hypervisor.seccomp_sandbox": _qemu("cmdline (-sandbox)"),
    "hypervisor.selinux_label": Refused("Kabuto does not label the VMM: it would run unconfined"),
    "hypervisor.rootless": Refused("Kabuto runs the VMM as the calling user, not a rootless one"),
    "hypervisor.rootless_user": Refused("Kabuto runs the VMM as the calling user, not this one"),
    "hypervisor.disable_seccomp": Applied("cloud-hypervisor and firecracker (--seccomp false)",
                                          ("hypervisor/cloud_hypervisor/backend.py",
                                           "hypervisor/firecracker/backend.py"), frozenset({CLH, FC})),
    "hypervisor.disable_selinux": WARNED,
    "hypervisor.disable_guest_selinux": Refused("the guest has no SELinux to enable"),
    "hypervisor.confidential_guest": Refused("Kabuto boots no confidential guests: it would run an "
                                             "ordinary one"),
    "hypervisor.sev_snp_guest": Refused("Kabuto boots no SEV-SNP guests: it would run an ordinary one"),
    "hypervisor.snp_id_block": WARNED,
    "hypervisor.snp_id_auth": WARNED,
    "hypervisor.snp_guest_policy": WARNED,
    "hypervisor.initdata": Refused("Kabuto hands no initdata (policy, attestation) to the guest"),
    "hypervisor.tdx_quote_generation_service_socket_port": WARNED,
    # debug
    "hypervisor.enable_debug": Applied("qemu cmdline (no quiet), cloud-hypervisor (-v)",
                                       ("hypervisor/qemu/cmdline.py",
                                        "hypervisor/cloud_hypervisor/backend.py"), frozenset({QEMU, CLH})),
    "hypervisor.log_level": WARNED,
    "hypervisor.extra_monitor_socket": WARNED,
    "hypervisor.debug_console_enabled": WARNED,
    "hypervisor.use_legacy_serial": WARNED,
    "hypervisor.guest_memory_dump_path": WARNED,
    "hypervisor.guest_memory_dump_paging": WARNED,
    "hypervisor.disable_nesting_checks": WARNED,
    # remote hypervisor and VM templating
    "hypervisor.hypervisor_socket": WARNED,
    "hypervisor.hypervisor_timeout": WARNED,
    "hypervisor.default_gpus": WARNED,
    "hypervisor.default_gpu_model": WARNED,
    "hypervisor.boot_to_be_template": WARNED,
    "hypervisor.boot_from_template": WARNED,
    "hypervisor.memory_path": WARNED,
    "hypervisor.device_state_path": WARNED,
    "hypervisor.factory.enable_template": _qemu("template mode: clones of a saved VM (kabuto factory)",
                                                "runtime/factory/template.py", "hypervisor/resolve.py"),
    "hypervisor.factory.template_path": _qemu("template mode: where templates live",
                                              "runtime/factory/template.py"),
    # [agent.<name>]: Kabuto's agent client keeps its own ports
    "agent.enable_debug": Applied("all backends: agent_log_level=DEBUG on the guest kernel command line",
                                  ("hypervisor/resolve.py",)),
    "agent.log_level": WARNED,
    "agent.enable_tracing": WARNED,
    "agent.debug_console_enabled": WARNED,
    "agent.visible_cdi_devices": WARNED,
    "agent.kernel_modules": WARNED,
    "agent.container_pipe_size": WARNED,
    "agent.server_port": Applied("all backends: agent_vsock_port= on the guest kernel command line, the "
                                 "port the agent serves vsock on and the host dials",
                                 ("hypervisor/resolve.py",)),
    "agent.log_port": WARNED,
    "agent.passfd_listener_port": WARNED,
    "agent.dial_timeout": WARNED,
    "agent.dial_timeout_ms": Applied("runtime: the pause between attempts to reach the agent",
                                     ("runtime/sandbox.py",)),
    "agent.reconnect_timeout_ms": Applied("runtime: the bound on reaching a running sandbox's agent",
                                          ("runtime/sandbox.py",)),
    "agent.request_timeout_ms": Applied("runtime: the bound of an agent call (CreateContainer: "
                                        "runtime.create_container_timeout)", ("runtime/sandbox.py",)),
    "agent.create_container_timeout": Applied("runtime: the bound of CreateContainer where [runtime] sets "
                                              "none (Kata keeps it here)",
                                              ("config/rules.py", "runtime/sandbox.py")),
    "agent.health_check_request_timeout_ms": WARNED,
    "agent.cdh_api_timeout_ms": WARNED,
    "agent.launch_process_timeout": WARNED,
    "agent.policy": Refused("Kabuto's guest agent enforces no policy: every request would be allowed"),
    **{f"agent.mem_agent.{key}": WARNED for key in (
        "mem_agent_enable", "memcg_disable", "memcg_swap", "memcg_swappiness_max", "memcg_period_secs",
        "memcg_period_psi_percent_limit", "memcg_eviction_psi_percent_limit",
        "memcg_eviction_run_aging_count_min", "compact_disable", "compact_period_secs",
        "compact_period_psi_percent_limit", "compact_psi_percent_limit", "compact_sec_max", "compact_order",
        "compact_threshold", "compact_force_times",
    )},
    # [runtime]
    "runtime.name": WARNED,
    "runtime.hypervisor_name": Applied("runtime: picks the plugin and table",
                                       ("hypervisor/resolve.py", "runtime/sandbox.py")),
    "runtime.agent_name": WARNED,
    "runtime.enable_debug": WARNED,
    "runtime.log_level": WARNED,
    "runtime.internetworking_model": Applied("runtime: tcfilter (taps + tc redirects) or none (no NIC); "
                                             "macvtap and l3forwarding refused by the [runtime] rules",
                                             ("runtime/sandbox.py", "config/rules.py")),
    "runtime.disable_guest_seccomp": Applied("runtime: a bundle's seccomp profile is refused unless true",
                                             ("runtime/sandbox.py",)),
    "runtime.disable_new_netns": WARNED,
    "runtime.sandbox_cgroup_only": Applied(
        "runtime: the sandbox's creator (the shim), so the VMM and virtiofsd, join the sandbox "
        "container's linux.cgroupsPath on the host (runtime/host_cgroup.py)", ("runtime/sandbox.py",)),
    "runtime.sandbox_bind_mounts": WARNED,
    "runtime.static_sandbox_resource_mgmt": WARNED,
    "runtime.enable_vcpus_pinning": WARNED,
    "runtime.enable_tracing": WARNED,
    "runtime.jaeger_endpoint": WARNED,
    "runtime.jaeger_user": WARNED,
    "runtime.jaeger_password": WARNED,
    "runtime.enable_pprof": WARNED,
    "runtime.vfio_mode": WARNED,
    "runtime.emptydir_mode": WARNED,
    "runtime.experimental": WARNED,
    "runtime.keep_abnormal": WARNED,
    "runtime.dan_conf": WARNED,
    "runtime.shared_mounts": WARNED,
    "runtime.use_passfd_io": WARNED,
    "runtime.passfd_listener_port": WARNED,
    "runtime.pod_resource_api_sock": WARNED,
    "runtime.kubelet_root_dir": WARNED,
    "runtime.create_container_timeout": Applied("runtime: the bound of the agent's CreateContainer",
                                                ("runtime/sandbox.py",)),
    # [factory] (the Go runtime's)
    "factory.enable_template": _qemu("template mode (the Go runtime's key; [hypervisor.<name>.factory] "
                                     "wins when it enables it)", "runtime/factory/template.py",
                                     "hypervisor/resolve.py"),
    "factory.template_path": _qemu("template mode: where templates live", "runtime/factory/template.py"),
    "factory.vm_cache_number": Applied("factory cache: VMs `kabuto factory serve` keeps booted; above 0 a "
                                       "sandbox takes one from it (else boots cold)",
                                       ("runtime/factory/cache.py", "cli/factory_serve_cmd.py")),
    "factory.vm_cache_endpoint": Applied("factory cache: the daemon's Unix socket",
                                         ("runtime/factory/cache.py", "cli/factory_serve_cmd.py")),
}

#: the model behind each table kind; a field holding one model is a table of its own
TABLES: dict[str, type[BaseModel]] = {
    "hypervisor": HypervisorConfig, "agent": AgentConfig, "runtime": RuntimeConfig, "factory": FactoryConfig,
}


def model_keys() -> Iterator[str]:
    """Every registry key the models define (nested single tables dotted, lists of tables whole)."""
    for kind, model in TABLES.items():
        yield from _fields(kind, model)


def _fields(prefix: str, model: type[BaseModel]) -> Iterator[str]:
    for name, info in model.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            yield from _fields(f"{prefix}.{name}", nested)
        else:
            yield f"{prefix}.{name}"


# -- applying the registry to a configuration ---------------------------------------------

def _active_tables(config: KabutoConfig) -> Iterator[tuple[str, str, BaseModel]]:
    """(registry kind, config path prefix, table) for the tables Kabuto uses."""
    name = config.runtime.hypervisor_name
    if name in config.hypervisor:
        yield "hypervisor", f"hypervisor.{name}", config.hypervisor[name]
    agent_name = config.runtime.agent_name
    if agent_name in config.agent:
        yield "agent", f"agent.{agent_name}", config.agent[agent_name]
    yield "runtime", "runtime", config.runtime
    yield "factory", "factory", config.factory


def _set_values(kind: str, path: str, table: BaseModel) -> Iterator[tuple[str, str, Any]]:
    """(registry key, config key path, value) for each field whose value is not the default."""
    defaults = type(table)()  # every field has a default, so the model's own default is the reference
    for name in type(table).model_fields:
        value, default = getattr(table, name), getattr(defaults, name)
        if isinstance(value, BaseModel) and f"{kind}.{name}" not in REGISTRY:
            yield from _set_values(f"{kind}.{name}", f"{path}.{name}", value)
        elif value != default and not _switched_off(f"{kind}.{name}", table):
            yield f"{kind}.{name}", f"{path}.{name}", value


def _switched_off(key: str, table: BaseModel) -> bool:
    switch = SWITCHED_BY.get(key)
    return switch is not None and not getattr(table, switch)


def _shown(key: str, value: Any) -> str:
    if key in SECRET_KEYS:
        return "(set, not shown)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v
                 for v in value]
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else json.dumps(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def _not_applied(entry: Coverage, backend: str) -> str | None:
    """Why a set value of this key does nothing under ``backend``, or None when it is used."""
    if entry is WARNED:
        return "parsed, not applied by Kabuto"
    if isinstance(entry, Applied) and entry.backends is not None and backend in BUILTIN_BACKENDS \
            and backend not in entry.backends:
        return f"parsed, not applied by the {backend} backend (only {', '.join(sorted(entry.backends))})"
    return None


def unapplied_warnings(config: KabutoConfig) -> list[str]:
    """One warning per key of the active tables that is set (or annotated) but not applied."""
    backend = config.runtime.hypervisor_name
    annotated = config.annotated
    warnings: list[str] = []
    for kind, prefix, table in _active_tables(config):
        set_paths = {path: (key, value) for key, path, value in _set_values(kind, prefix, table)}
        # an annotation asked for the key explicitly: say so even when it wrote the default
        for path in annotated:
            if path.startswith(f"{prefix}.") and path not in set_paths:
                key = f"{kind}.{path[len(prefix) + 1:]}"
                if key in REGISTRY:
                    set_paths[path] = (key, _get(table, path[len(prefix) + 1:]))
        for path, (key, value) in set_paths.items():
            reason = _not_applied(REGISTRY[key], backend)
            if reason is None:
                continue
            origin = f" (set by annotation {annotated[path]})" if path in annotated else ""
            warnings.append(f"{path} = {_shown(key, value)}: {reason}{origin}")
    return warnings


def refused_problems(config: KabutoConfig) -> list[Problem]:
    """A problem for each key of the active tables Kabuto refuses to take a set value for."""
    problems: list[Problem] = []
    for kind, prefix, table in _active_tables(config):
        for key, path, value in _set_values(kind, prefix, table):
            entry = REGISTRY[key]
            if isinstance(entry, Refused):
                shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                problems.append(Problem(path, shown, f"not supported by Kabuto: {entry.why}"))
    return problems


def refusal(kind: str, key: str, value: Any, model: type[BaseModel]) -> str | None:
    """Why an annotation may not set ``key`` to ``value``, or None (for kabuto.config.annotations)."""
    entry = REGISTRY.get(f"{kind}.{key}")
    if isinstance(entry, Refused) and value != model.model_fields[key].get_default(call_default_factory=True):
        return f"not supported by Kabuto: {entry.why}"
    return None


def _get(table: BaseModel, dotted: str) -> Any:
    value: Any = table
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
