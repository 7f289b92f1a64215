"""The one road from configuration to backend, for new and restored VMs alike.

    load_config (files, drop-ins, annotations: data)  ->  resolve: name -> plugin -> adjust -> validate
      ->  new_hypervisor: the plugin's backend with the effective table
    saved HypervisorState (it holds the effective table)  ->  restore_hypervisor: the same backend class

The name becomes a plugin here, once; the backend is handed that plugin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kabuto.config.annotations import check_enable_annotations
from kabuto.config.loader import load_config
from kabuto.config.model import HypervisorConfig, KabutoConfig
from kabuto.config.rules import common_problems, prefixed, raise_problems
from kabuto.errors import ConfigError, HypervisorError, Problem
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, Hypervisor, HypervisorState
from kabuto.hypervisor.capabilities import SHARED_FS_VALUES
from kabuto.hypervisor.devices import AGENT_VSOCK_PORT, AGENT_VSOCK_PORT_PARAM, SharedFsKind
from kabuto.hypervisor.plugin import HypervisorPlugin
from kabuto.hypervisor.registry import get_plugin, hypervisor_names, load_warnings

#: the guest's /init hands the agent this log level (kabuto/image/init.sh)
AGENT_DEBUG_PARAM = "agent_log_level=DEBUG"


@dataclass(frozen=True)
class ResolvedConfig:
    """A configuration whose hypervisor name became a plugin, which adjusted (and, unless asked
    not to, validated) the active table."""

    config: KabutoConfig
    plugin: HypervisorPlugin

    @property
    def name(self) -> str:
        return self.config.runtime.hypervisor_name

    @property
    def table(self) -> HypervisorConfig:
        return self.config.active_hypervisor


def resolve(config: KabutoConfig, *, validate: bool = True) -> ResolvedConfig:
    """The active table adjusted by its plugin, then every problem checked at once.

    ``validate=False`` skips only the value checks (to show a configuration that cannot run yet).
    """
    name = hypervisor_names().require(config.runtime.hypervisor_name)
    table = config.hypervisor.get(name)
    if table is None:
        raise ConfigError(f"runtime.hypervisor_name = {name!r} but there is no [hypervisor.{name}] table")
    config.runtime.hypervisor_name = name
    plugin = get_plugin(name)
    config.warnings = [*load_warnings(), *config.warnings]
    plugin.adjust(table)
    # on every backend's kernel command line, so the saved table keeps it for a restored VM
    if config.active_agent.enable_debug and AGENT_DEBUG_PARAM not in table.kernel_params.split():
        table.kernel_params = f"{table.kernel_params} {AGENT_DEBUG_PARAM}".strip()
    # the guest's /init hands the agent this port; the backends read it back for the host's end
    port_problems = _agent_port(config, table)
    if validate:
        # the regexes of a table an annotation switched to were not checked by the loader
        own = check_enable_annotations(table) + plugin.validate(table)
        problems = prefixed(f"hypervisor.{name}", own) + common_problems(config) + port_problems
        problems += _template_problems(config, name, table)
        raise_problems(config, problems)
    return ResolvedConfig(config, plugin)


def _template_problems(config: KabutoConfig, name: str, table: HypervisorConfig) -> list[Problem]:
    """A template's clones map its memory private, and vhost-user (virtiofsd) needs guest memory
    shared (a vhost-user-fs device also blocks migration): refused by name, as Kata's Go runtime
    refused templating with virtio-fs; no silent switch to 9p."""
    if SHARED_FS_VALUES.get(table.shared_fs) != SharedFsKind.VIRTIO_FS:
        return []
    keys = [key for key, on in ((f"hypervisor.{name}.factory.enable_template", table.factory.enable_template),
                                ("factory.enable_template", config.factory.enable_template)) if on]
    why = (f"VM templates need hypervisor.{name}.shared_fs = \"virtio-9p\" (or \"none\"), not "
           f"{table.shared_fs!r}: a clone maps the template's memory private, and virtio-fs needs it shared")
    return [Problem(key, True, why) for key in keys]


def _agent_port(config: KabutoConfig, table: HypervisorConfig) -> list[Problem]:
    """Put [agent] server_port on the kernel command line unless it is Kata's 1024 (what the agent
    serves without the word); a different agent_vsock_port= already there is a conflict."""
    port = config.active_agent.server_port
    written = [word.partition("=")[2] for word in table.kernel_params.split()
               if word.partition("=")[0] == AGENT_VSOCK_PORT_PARAM]
    wrong = [value for value in written if value != str(port)]
    if wrong:
        return [Problem(f"hypervisor.{config.runtime.hypervisor_name}.kernel_params", table.kernel_params,
                        f"{AGENT_VSOCK_PORT_PARAM}={wrong[0]} contradicts "
                        f"agent.{config.runtime.agent_name}.server_port ({port}): set the port there only")]
    if port != AGENT_VSOCK_PORT and not written:
        table.kernel_params = f"{table.kernel_params} {AGENT_VSOCK_PORT_PARAM}={port}".strip()
    return []


def resolve_config(
    path: str | os.PathLike[str] | None = None,
    annotations: Mapping[str, str] | None = None,
    hypervisor_name: str | None = None,
    *,
    validate: bool = True,
) -> ResolvedConfig:
    """``load_config`` with the registered names, then ``resolve``: what a sandbox boots with."""
    return resolve(load_config(path, annotations, hypervisor_name, names=hypervisor_names()),
                   validate=validate)


def adjusted_table(config: KabutoConfig | None, name: str) -> HypervisorConfig:
    """A copy of ``[hypervisor.<name>]`` adjusted by its plugin, or the plugin's defaults.

    For showing every plugin's availability (``kabuto hypervisors``) without validating.
    """
    name = hypervisor_names().require(name)
    plugin = get_plugin(name)
    present = config.hypervisor.get(name) if config is not None else None
    table = present.model_copy(deep=True) if present is not None else HypervisorConfig()
    if present is None or config is None or name != config.runtime.hypervisor_name:
        plugin.adjust(table)
    return table


def _backend_class(name: str, plugin: HypervisorPlugin) -> type[Hypervisor]:
    cls = plugin.backend()
    if not (isinstance(cls, type) and issubclass(cls, Hypervisor)):
        raise HypervisorError(f"plugin {name!r} returned {cls!r}, which is not a Hypervisor")
    return cls


def new_hypervisor(resolved: ResolvedConfig, jailer_root: Path = DEFAULT_JAILER_ROOT) -> Hypervisor:
    """Build the backend the resolved plugin names, with the effective table."""
    cls = _backend_class(resolved.name, resolved.plugin)
    return cls(resolved.table, jailer_root=jailer_root, plugin=resolved.plugin)


async def restore_hypervisor(state: HypervisorState, jailer_root: Path = DEFAULT_JAILER_ROOT) -> Hypervisor:
    """Drive a VM another process started, with the table it booted with (saved in ``state``)."""
    plugin = get_plugin(state.hypervisor_name)
    return await _backend_class(state.hypervisor_name, plugin).restore(state, jailer_root=jailer_root,
                                                                        plugin=plugin)
