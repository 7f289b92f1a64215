"""Registry of hypervisor plugins and the factory that builds a backend from the config."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from pathlib import Path

from kabuto.config.model import KabutoConfig
from kabuto.errors import ConfigError, HypervisorError
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, Hypervisor
from kabuto.hypervisor.plugin import HypervisorPlugin

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kabuto.hypervisors"
_BUILTIN = {
    "qemu": "kabuto.hypervisor.qemu",
    "cloud-hypervisor": "kabuto.hypervisor.cloud_hypervisor",
    "firecracker": "kabuto.hypervisor.firecracker",
    "dragonball": "kabuto.hypervisor.dragonball",
}

_plugins: dict[str, HypervisorPlugin] = {}
_aliases: dict[str, str] = {}
_loaded = False


def register_hypervisor_plugin(name: str, plugin: HypervisorPlugin) -> None:
    """Register ``plugin`` under ``name`` (and its aliases); a later registration wins."""
    if not isinstance(plugin, HypervisorPlugin):
        raise TypeError(f"hypervisor plugin {name!r} does not implement HypervisorPlugin")
    _plugins[name] = plugin
    for alias in getattr(plugin, "aliases", ()):
        _aliases[alias] = name


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _BUILTIN.items():
        if name not in _plugins:
            register_hypervisor_plugin(name, importlib.import_module(module).plugin)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            register_hypervisor_plugin(ep.name, obj() if isinstance(obj, type) else obj)
        except Exception as exc:  # a broken third-party plugin must not break the runtime
            log.warning("hypervisor plugin %r from %s failed to load: %s", ep.name, ep.value, exc)


def canonical_name(name: str) -> str:
    _load()
    return _aliases.get(name, name)


def registered_names() -> list[str]:
    _load()
    return sorted(_plugins)


def get_plugin(name: str) -> HypervisorPlugin:
    _load()
    plugin = _plugins.get(canonical_name(name))
    if plugin is None:
        raise ConfigError(
            f"unknown hypervisor {name!r}; registered: {', '.join(registered_names())}"
        )
    return plugin


def new_hypervisor(config: KabutoConfig, jailer_root: Path = DEFAULT_JAILER_ROOT) -> Hypervisor:
    """Build the backend named by ``runtime.hypervisor_name`` with its table."""
    name = canonical_name(config.runtime.hypervisor_name)
    plugin = get_plugin(name)
    table = config.hypervisor.get(name)
    if table is None:
        raise ConfigError(f"runtime.hypervisor_name = {name!r} but there is no [hypervisor.{name}] table")
    cls = plugin.backend()
    if not issubclass(cls, Hypervisor):
        raise HypervisorError(f"plugin {name!r} returned {cls!r}, which is not a Hypervisor")
    return cls(table, jailer_root=jailer_root)
