"""Kata's VM factory: warm VMs a sandbox can start from instead of booting cold (template
clones, or a cache daemon's booted VMs)."""

from __future__ import annotations

from kabuto.hypervisor import ResolvedConfig
from kabuto.runtime.factory.cache import CacheSource, cache_endpoint
from kabuto.runtime.factory.source import FactoryError, WarmRequest, WarmSource
from kabuto.runtime.factory.template import TemplateSource, template_settings

__all__ = ["FactoryError", "WarmRequest", "WarmSource", "warm_source"]


def warm_source(resolved: ResolvedConfig) -> WarmSource | None:
    """The warm source the configuration enables, or None (boot cold). With both on, the
    template wins: a clone starts faster than a cached VM is handed over and adopted."""
    if template_settings(resolved.config, resolved.name, resolved.table).enabled:
        return TemplateSource()
    if cache_endpoint(resolved) is not None:
        return CacheSource()
    return None
