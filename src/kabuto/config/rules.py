"""Rules on configuration data that do not need a VMM: which hypervisor names exist, which
keys a ``valid_*_paths`` list guards, glob matching of paths, the [runtime] and [agent] checks
(and the agent timeouts made consistent), and naming the annotation behind a problem.

The hypervisor registry hands the loader a ``HypervisorNames``; config/ never asks for it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from kabuto.config.keys import refused_problems
from kabuto.config.model import AgentConfig, KabutoConfig
from kabuto.errors import AnnotationError, ConfigError, Problem

INTERNETWORKING_MODELS = ("macvtap", "none", "tcfilter", "l3forwarding")
#: Kata's models Kabuto does not build, and why (refused rather than run as another model)
UNIMPLEMENTED_MODELS = {
    "macvtap": "not built in Kabuto: it needs a macvtap device per interface and its /dev/tapN "
               "descriptors handed to the VMM; use \"tcfilter\" (Kata's default) or \"none\"",
    "l3forwarding": "not built in Kabuto (Kata's Go runtime only); use \"tcfilter\" or \"none\"",
}
VFIO_MODES = ("", "vfio", "guest-kernel")
EMPTYDIR_MODES = ("shared-fs", "block-encrypted", "block-plain")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "critical")


@dataclass(frozen=True)
class HypervisorNames:
    """The registered hypervisor names and the aliases that select them (``clh``)."""

    registered: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def require(self, name: str) -> str:
        """The canonical name; ConfigError listing the registered ones if it is none of them."""
        canonical = self.canonical(name)
        if canonical not in self.registered:
            raise ConfigError(
                f"unknown hypervisor {name!r}; registered: {', '.join(sorted(self.registered)) or '(none)'}"
            )
        return canonical


_VALID_PATHS = {
    "path": "valid_hypervisor_paths",
    "kernel": "valid_kernel_paths",
    "initrd": "valid_initrd_paths",
    "image": "valid_image_paths",
    "firmware": "valid_firmware_paths",
    "jailer_path": "valid_jailer_paths",
    "virtio_fs_daemon": "valid_virtio_fs_daemon_paths",
    "ctlpath": "valid_ctlpaths",
    "file_mem_backend": "valid_file_mem_backends",
    "entropy_source": "valid_entropy_sources",
    "vhost_user_store_path": "valid_vhost_user_store_paths",
}


def valid_paths_key(key: str) -> str | None:
    """The ``valid_*_paths`` list that guards ``key``, if any."""
    return _VALID_PATHS.get(key)


def path_allowed(value: str, globs: list[str]) -> bool:
    """True when ``value`` matches one of ``globs`` (an empty list allows everything).

    Matching is on the normalised path, so ``..`` cannot climb out of an allowed directory,
    and ``*`` also matches ``/`` as in Kata's glob patterns. An empty value is allowed only
    when ``""`` is listed (Kata's valid_entropy_sources does that).
    """
    if not globs:
        return True
    if not value:
        return "" in globs
    normalised = os.path.normpath(value)
    return any(glob and fnmatchcase(normalised, glob) for glob in globs)


def prefixed(prefix: str, problems: list[Problem]) -> list[Problem]:
    return [Problem(f"{prefix}.{p.key}", p.value, p.reason) for p in problems]


def common_problems(config: KabutoConfig) -> list[Problem]:
    """Kata's [runtime] and [agent] rules (the hypervisor's belong to its plugin)."""
    problems: list[Problem] = []
    runtime = config.runtime
    if not runtime.name:
        problems.append(Problem("runtime.name", runtime.name, "must not be empty"))
    for key, allowed in (("internetworking_model", INTERNETWORKING_MODELS), ("vfio_mode", VFIO_MODES),
                         ("emptydir_mode", EMPTYDIR_MODES), ("log_level", LOG_LEVELS)):
        value = getattr(runtime, key)
        if value not in allowed:
            choices = ", ".join(map(repr, allowed))
            problems.append(Problem(f"runtime.{key}", value, f"must be one of {choices}"))
    if runtime.internetworking_model in UNIMPLEMENTED_MODELS:
        problems.append(Problem("runtime.internetworking_model", runtime.internetworking_model,
                                UNIMPLEMENTED_MODELS[runtime.internetworking_model]))
    if runtime.create_container_timeout <= 0:
        problems.append(Problem("runtime.create_container_timeout", runtime.create_container_timeout,
                                "must be a positive number of seconds"))
    if config.agent and runtime.agent_name not in config.agent:
        have = ", ".join(sorted(config.agent))
        problems.append(Problem("runtime.agent_name", runtime.agent_name,
                                f"no [agent.{runtime.agent_name}] table (have: {have})"))
    for name, agent in config.agent.items():
        problems += _agent_problems(f"agent.{name}", agent)
    active = config.agent.get(runtime.agent_name)
    if active is not None and "create_container_timeout" in active.model_fields_set \
            and active.create_container_timeout != runtime.create_container_timeout:
        problems.append(Problem(f"agent.{runtime.agent_name}.create_container_timeout",
                                active.create_container_timeout,
                                f"differs from runtime.create_container_timeout "
                                f"({runtime.create_container_timeout}), the bound of CreateContainer: "
                                "set one of them"))
    return problems + refused_problems(config)


def reconcile_create_container_timeout(config: KabutoConfig) -> None:
    """Kata keeps create_container_timeout in [agent.<name>], Kabuto in [runtime], where it bounds
    CreateContainer: the agent table's value is that bound when [runtime] sets none."""
    agent = config.agent.get(config.runtime.agent_name)
    if agent is not None and "create_container_timeout" in agent.model_fields_set \
            and "create_container_timeout" not in config.runtime.model_fields_set \
            and agent.create_container_timeout > 0:
        config.runtime.create_container_timeout = agent.create_container_timeout


def reconcile_agent_timeouts(config: KabutoConfig) -> list[str]:
    """Raise an unset reconnect_timeout_ms to a larger dial_timeout_ms; the warnings saying so.

    Kata's stock Firecracker file sets dial_timeout_ms = 45000 and leaves reconnect_timeout_ms at
    its default (3000), which Kata's own rule refuses. Only a reconnect_timeout_ms the files left
    unset is raised: one written below dial_timeout_ms stays an error (``_agent_problems``).
    """
    warnings = []
    for name, agent in config.agent.items():
        dial = agent.dial_timeout_ms
        if dial > agent.reconnect_timeout_ms and "reconnect_timeout_ms" not in agent.model_fields_set:
            warnings.append(f"agent.{name}.dial_timeout_ms = {dial} without "
                            f"agent.{name}.reconnect_timeout_ms: reconnect_timeout_ms raised from "
                            f"{agent.reconnect_timeout_ms} to {dial}")
            agent.reconnect_timeout_ms = dial
    return warnings


def _agent_problems(prefix: str, agent: AgentConfig) -> list[Problem]:
    problems: list[Problem] = []
    # 0 would leave the host's agent calls unbounded
    if agent.request_timeout_ms <= 0:
        problems.append(Problem(f"{prefix}.request_timeout_ms", agent.request_timeout_ms, "must be positive"))
    if agent.dial_timeout_ms <= 0:
        problems.append(Problem(f"{prefix}.dial_timeout_ms", agent.dial_timeout_ms, "must be positive"))
    elif agent.reconnect_timeout_ms < agent.dial_timeout_ms:
        problems.append(Problem(f"{prefix}.reconnect_timeout_ms", agent.reconnect_timeout_ms,
                                f"below {prefix}.dial_timeout_ms ({agent.dial_timeout_ms}); "
                                "raise it, or leave it unset to follow dial_timeout_ms"))
    if agent.log_level not in LOG_LEVELS:
        problems.append(Problem(f"{prefix}.log_level", agent.log_level,
                                f"must be one of {', '.join(LOG_LEVELS)}"))
    # a vsock port: 0xFFFFFFFF is VMADDR_PORT_ANY
    if not 0 < agent.server_port < 0xFFFFFFFF:
        problems.append(Problem(f"{prefix}.server_port", agent.server_port,
                                "must be a vsock port from 1 to 4294967294"))
    if agent.create_container_timeout <= 0:
        problems.append(Problem(f"{prefix}.create_container_timeout", agent.create_container_timeout,
                                "must be a positive number of seconds"))
    for key in ("container_pipe_size", "log_port", "passfd_listener_port", "dial_timeout",
                "health_check_request_timeout_ms",
                "cdh_api_timeout_ms", "launch_process_timeout"):
        if getattr(agent, key) < 0:
            problems.append(Problem(f"{prefix}.{key}", getattr(agent, key), "must not be negative"))
    return problems


def raise_problems(config: KabutoConfig, problems: list[Problem]) -> None:
    """Raise ConfigError listing ``problems`` (AnnotationError naming the annotation behind any
    key one set); return when there are none."""
    if not problems:
        return
    from_annotations = config.annotated
    marked = [
        Problem(p.key, p.value, f"{p.reason} (set by annotation {from_annotations[_base_key(p.key)]})")
        if _base_key(p.key) in from_annotations else p
        for p in problems
    ]
    if marked != problems:
        raise AnnotationError(f"annotations make the configuration {config.source} invalid", marked)
    raise ConfigError(f"invalid configuration {config.source}", problems)


def _base_key(key: str) -> str:
    return re.sub(r"\[\d+\]$", "", key)
