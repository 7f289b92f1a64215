"""Registry of hypervisor plugins: built-in ones, entry points, names and aliases."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from kabuto.config.rules import HypervisorNames
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
_load_errors: list[str] = []
_loaded = False


def register_hypervisor_plugin(name: str, plugin: HypervisorPlugin) -> None:
    """Register ``plugin`` under ``name`` (and its aliases); a later registration wins."""
    if not isinstance(plugin, HypervisorPlugin):
        raise TypeError(f"hypervisor plugin {name!r} does not implement HypervisorPlugin")
    _plugins[name] = plugin
    for alias in getattr(plugin, "aliases", ()):
        _aliases[alias] = name


def unregister_hypervisor_plugin(name: str) -> None:
    """Forget ``name`` and its aliases (a no-op when it is not registered)."""
    _plugins.pop(name, None)
    for alias in [a for a, target in _aliases.items() if target == name]:
        del _aliases[alias]


def _warn(message: str) -> None:
    log.warning("%s", message)
    _load_errors.append(message)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _BUILTIN.items():
        if name in _plugins:
            continue
        try:
            register_hypervisor_plugin(name, importlib.import_module(module).plugin)
        except Exception as exc:  # one broken backend must not take the others down
            _warn(f"built-in hypervisor plugin {name!r} failed to load: {exc}")
    load_entry_points()


def load_entry_points() -> list[str]:
    """Register the plugins of the ``kabuto.hypervisors`` entry-point group; return their names.

    Called once automatically; call it again after installing a plugin at run time.
    A plugin that fails to load is reported as a warning and skipped.
    """
    loaded: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            register_hypervisor_plugin(ep.name, obj() if isinstance(obj, type) else obj)
            loaded.append(ep.name)
        except Exception as exc:  # a broken third-party plugin must not break the runtime
            _warn(f"hypervisor plugin {ep.name!r} from {ep.value} failed to load: {exc}")
    return loaded


def load_warnings() -> list[str]:
    """Why plugins failed to load (empty when all loaded)."""
    _load()
    return list(_load_errors)


def canonical_name(name: str) -> str:
    _load()
    return _aliases.get(name, name)


def registered_names() -> list[str]:
    _load()
    return sorted(_plugins)


def aliases_of(name: str) -> list[str]:
    """Every alias that selects the plugin registered as ``name``."""
    _load()
    return sorted(alias for alias, target in _aliases.items() if target == name)


def hypervisor_names() -> HypervisorNames:
    """What the configuration loader needs to know of the registry: names and aliases."""
    _load()
    return HypervisorNames(frozenset(_plugins), dict(_aliases))


def get_plugin(name: str) -> HypervisorPlugin:
    """The plugin registered as ``name`` (or an alias); ConfigError naming the registered ones."""
    return _plugins[hypervisor_names().require(name)]
