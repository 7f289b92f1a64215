"""OCI annotations that override configuration keys: a security boundary.

A pod's annotations are untrusted input. A hypervisor key changes only when the active
table's ``enable_annotations`` allows it (each entry a regular expression that must match
the whole key: unlike Kata, ``"path"`` does not also enable ``jailer_path``), and a path
changes only to one matching the key's ``valid_*_paths`` globs, which must not be empty.
Runtime and agent keys are not gated (as in Kata) but only a short, harmless list exists.
Anything else under these prefixes is refused with an AnnotationError, and so is a value for a
key Kabuto refuses (kabuto.config.keys); one for a key Kabuto does not apply is set and
warned about by the loader. Annotations with other prefixes are none of our business and are
ignored.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from kabuto.config.keys import refusal
from kabuto.config.model import AgentConfig, HypervisorConfig, KabutoConfig, RuntimeConfig
from kabuto.config.rules import HypervisorNames, path_allowed, valid_paths_key
from kabuto.errors import AnnotationError, Problem

HYPERVISOR_PREFIXES = ("io.katacontainers.config.hypervisor.", "io.kabuto.config.hypervisor.")
AGENT_PREFIXES = ("io.katacontainers.config.agent.", "io.kabuto.config.agent.")
RUNTIME_PREFIXES = ("io.katacontainers.config.runtime.", "io.kabuto.config.runtime.")

#: the host bounds what a pod can hand it
MAX_ANNOTATION_VALUE = 4096
MAX_CREATE_CONTAINER_TIMEOUT_S = 3600

# Annotation suffix -> table key, for the keys Kata runtime-rs lets annotations set (plus the
# Go runtime's guarded ctlpath, file_mem_backend and msize_9p). Never the allow-lists.
_HYPERVISOR_KEYS: dict[str, str] = {
    name: name
    for name in (
        "path", "ctlpath", "jailer_path", "enable_iothreads", "indep_iothreads", "block_device_driver",
        "disable_block_device_use", "block_device_cache_set", "block_device_cache_direct",
        "block_device_cache_noflush", "disable_image_nvdimm", "memory_offset", "enable_vhost_user_store",
        "vhost_user_store_path", "kernel", "kernel_params", "kernel_verity_params", "image", "initrd",
        "firmware", "cpu_features", "default_vcpus", "pcie_root_port", "pcie_switch_port", "enable_iommu",
        "enable_iommu_platform", "machine_type", "machine_accelerators", "entropy_source", "default_memory",
        "memory_slots", "enable_mem_prealloc", "enable_hugepages", "hugepage_type", "enable_virtio_mem",
        "enable_guest_swap", "disable_vhost_net", "rx_rate_limiter_max_rate", "tx_rate_limiter_max_rate",
        "network_queues", "guest_hook_path", "rootless", "shared_fs", "virtio_fs_daemon", "virtio_fs_cache",
        "virtio_fs_cache_size", "virtio_fs_extra_args", "file_mem_backend", "msize_9p", "default_gpus",
        "default_gpu_model",
    )
} | {
    "default_max_vcpus": "default_maxvcpus",
    "blk_logical_sector_size": "block_device_logical_sector_size",
    "blk_physical_sector_size": "block_device_physical_sector_size",
    "block_device_num_queues": "num_queues",
    "block_device_queue_size": "queue_size",
    "prefetch_files.list": "prefetch_list_path",
}

_AGENT_KEYS = ("kernel_modules", "enable_tracing", "container_pipe_size", "cdh_api_timeout_ms")
_RUNTIME_KEYS = (
    "hypervisor_name", "agent_name", "create_container_timeout", "disable_guest_seccomp", "enable_pprof",
    "sandbox_cgroup_only", "enable_vcpus_pinning", "experimental", "internetworking_model", "vfio_mode",
)

_MEMORY_UNITS = {
    "": 1 << 20, "b": 1, "k": 1000, "kb": 1000, "ki": 1 << 10, "kib": 1 << 10, "m": 10**6, "mb": 10**6,
    "mi": 1 << 20, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "gi": 1 << 30, "gib": 1 << 30,
    "t": 10**12, "tb": 10**12, "ti": 1 << 40, "tib": 1 << 40,
}


class _Refused(Exception):
    """Internal: why one annotation value cannot be used."""


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise _Refused("must be true or false")
    return value == "true"


def _unsigned(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,20}", value) or int(value) >= 1 << 64:
        raise _Refused("must be a non-negative integer")
    return int(value)


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _Refused("must be a number") from None
    if not math.isfinite(number) or number < 0:
        raise _Refused("must be a finite, non-negative number")
    return number


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _memory_mib(value: str) -> int:
    """Kata's byte-unit strings ("2Gi", "512MiB", "1G"); a bare number is MiB."""
    match = re.fullmatch(r"([0-9]{1,15})\s*([A-Za-z]{0,3})", value)
    unit = _MEMORY_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise _Refused("must be a size such as 2048, 512Mi or 2Gi")
    return int(match.group(1)) * unit // (1 << 20)


def _converter(model: type, key: str) -> Callable[[str], Any]:
    annotation = model.model_fields[key].annotation
    if annotation is bool:
        return _bool
    if annotation is int:
        return _unsigned
    if annotation is float:
        return _float
    if annotation == list[str]:
        return _list
    return str


def _refuse_unsupported(kind: str, key: str, value: Any, model: type) -> None:
    """A key Kabuto refuses (kabuto.config.keys) is refused here too, naming the annotation."""
    why = refusal(kind, key, value, model)
    if why:
        raise _Refused(why)


def merge_kernel_params(current: str, extra: str) -> str:
    """Kata's rule: a parameter in ``extra`` replaces every one with the same name in ``current``."""
    added = extra.split()
    names = {param.split("=", 1)[0] for param in added}
    kept = [param for param in current.split() if param.split("=", 1)[0] not in names]
    return " ".join(kept + added)


def _enabled(table: HypervisorConfig, suffix: str) -> bool:
    for pattern in table.enable_annotations:
        try:
            if re.fullmatch(pattern, suffix):
                return True
        except re.error:  # reported by check_enable_annotations
            continue
    return False


def check_enable_annotations(table: HypervisorConfig) -> list[Problem]:
    """Every ``enable_annotations`` entry must be a valid regular expression."""
    problems = []
    for pattern in table.enable_annotations:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(Problem("enable_annotations", pattern, f"not a regular expression: {exc}"))
    return problems


def _hypervisor_value(name: str, table: HypervisorConfig, suffix: str, raw: str) -> tuple[str, Any]:
    key = _HYPERVISOR_KEYS.get(suffix)
    if key is None:
        raise _Refused("not a hypervisor key annotations may set")
    if not _enabled(table, suffix):
        raise _Refused(f"not allowed by hypervisor.{name}.enable_annotations {table.enable_annotations}")
    guard = valid_paths_key(key)
    if guard:
        globs = list(getattr(table, guard))
        if not globs:
            raise _Refused(f"paths from annotations need hypervisor.{name}.{guard}, which is empty")
        if raw and not os.path.isabs(raw):
            raise _Refused("must be an absolute path")
        if not path_allowed(raw, globs):
            raise _Refused(f"{raw!r} does not match hypervisor.{name}.{guard} {globs}")
        return key, os.path.normpath(raw) if raw else raw
    if key == "default_memory":
        return key, _memory_mib(raw)
    if key == "kernel_params":
        return key, merge_kernel_params(table.kernel_params, raw)
    if key == "virtio_fs_extra_args":
        return key, [*table.virtio_fs_extra_args, *_list(raw)]
    value = _converter(HypervisorConfig, key)(raw)
    _refuse_unsupported("hypervisor", key, value, HypervisorConfig)
    if key == "guest_hook_path" and value and not os.path.isabs(value):
        raise _Refused("must be an absolute path")
    if key in ("pcie_root_port", "pcie_switch_port") and value > 16:
        raise _Refused("at most 16")
    return key, value


def _apply_agent(agent: AgentConfig, suffix: str, raw: str) -> str:
    if suffix not in _AGENT_KEYS:
        raise _Refused("not an agent key annotations may set")
    if suffix == "kernel_modules":
        agent.kernel_modules = [*agent.kernel_modules, *(m.strip() for m in raw.split(";") if m.strip())]
    else:
        value = _converter(AgentConfig, suffix)(raw)
        _refuse_unsupported("agent", suffix, value, AgentConfig)
        setattr(agent, suffix, value)
    return f"agent.kata.{suffix}"


def _apply_runtime(config: KabutoConfig, file_tables: set[str], names: HypervisorNames, suffix: str,
                   raw: str) -> str:
    runtime = config.runtime
    if suffix not in _RUNTIME_KEYS:
        raise _Refused("not a runtime key annotations may set")
    if suffix == "hypervisor_name":
        name = names.canonical(raw)
        if name not in file_tables:
            raise _Refused(f"the configuration has no [hypervisor.{name}] table to switch to")
        runtime.hypervisor_name = name
    elif suffix == "agent_name":
        if raw not in config.agent:
            raise _Refused(f"the configuration has no [agent.{raw}] table to switch to")
        runtime.agent_name = raw
    elif suffix == "create_container_timeout":
        seconds = _unsigned(raw)
        if not 0 < seconds <= MAX_CREATE_CONTAINER_TIMEOUT_S:
            raise _Refused(f"must be from 1 to {MAX_CREATE_CONTAINER_TIMEOUT_S} seconds")
        runtime.create_container_timeout = seconds
        agent = config.agent.get(runtime.agent_name)
        if agent is not None:
            agent.create_container_timeout = seconds
            agent.request_timeout_ms = seconds * 1000
    elif suffix == "experimental":
        runtime.experimental = [*runtime.experimental, *_list(raw)]
    else:
        value = _converter(RuntimeConfig, suffix)(raw)
        _refuse_unsupported("runtime", suffix, value, RuntimeConfig)
        setattr(runtime, suffix, value)
    return f"runtime.{suffix}"


def _strip_prefix(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def apply_annotations(
    config: KabutoConfig, annotations: Mapping[str, str], file_tables: set[str],
    names: HypervisorNames | None = None,
) -> dict[str, str]:
    """Apply every annotation for us, or raise AnnotationError listing each refused one.

    ``file_tables`` names the hypervisor tables the operator's files define: the only ones
    a runtime.hypervisor_name annotation may switch to (by a name or an alias in ``names``).
    Returns {config key path: annotation}
    for the keys changed, so that later validation problems can name the annotation.
    """
    names = names if names is not None else HypervisorNames()
    problems: list[Problem] = []
    applied: dict[str, str] = {}
    # switch tables first, so that the other annotations apply to the chosen ones
    switches = (".hypervisor_name", ".agent_name")
    ordered = sorted(annotations.items(), key=lambda item: not str(item[0]).endswith(switches))
    for key, raw in ordered:
        if not isinstance(key, str):
            continue
        runtime_suffix = _strip_prefix(key, RUNTIME_PREFIXES)
        agent_suffix = _strip_prefix(key, AGENT_PREFIXES)
        hypervisor_suffix = _strip_prefix(key, HYPERVISOR_PREFIXES)
        if runtime_suffix is None and agent_suffix is None and hypervisor_suffix is None:
            continue
        try:
            if not isinstance(raw, str):
                raise _Refused("the value must be a string")
            if len(raw) > MAX_ANNOTATION_VALUE:
                raise _Refused(f"the value is longer than {MAX_ANNOTATION_VALUE} characters")
            raw = raw.strip()
            if "\0" in raw:
                raise _Refused("the value contains a NUL character")
            if runtime_suffix is not None:
                applied[_apply_runtime(config, file_tables, names, runtime_suffix, raw)] = key
            elif agent_suffix is not None:
                name = config.runtime.agent_name
                agent = config.agent.setdefault(name, AgentConfig())
                applied[_apply_agent(agent, agent_suffix, raw).replace(".kata.", f".{name}.")] = key
            elif hypervisor_suffix is not None:
                name = config.runtime.hypervisor_name
                table = config.hypervisor[name]
                field, value = _hypervisor_value(name, table, hypervisor_suffix, raw)
                setattr(table, field, value)
                applied[f"hypervisor.{name}.{field}"] = key
        except _Refused as exc:
            problems.append(Problem(key, raw, str(exc)))
        except ValueError as exc:  # pydantic rejected the converted value
            problems.append(Problem(key, raw, f"invalid value: {_first_line(exc)}"))
    if problems:
        raise AnnotationError("refused annotations", problems)
    return applied


def _first_line(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return lines[-1].strip() if lines else type(exc).__name__
