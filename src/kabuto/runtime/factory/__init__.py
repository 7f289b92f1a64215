"""Kata's VM factory: warm VMs a sandbox can start from instead of booting cold."""

from __future__ import annotations

from kabuto.hypervisor import ResolvedConfig
from kabuto.runtime.factory.source import FactoryError, WarmRequest, WarmSource
from kabuto.runtime.factory.template import TemplateSource, template_settings

__all__ = ["FactoryError", "WarmRequest", "WarmSource", "warm_source"]


def warm_source(resolved: ResolvedConfig) -> WarmSource | None:
    """The warm source the configuration enables, or None (boot cold)."""
    if template_settings(resolved.config, resolved.name, resolved.table).enabled:
        return TemplateSource()
    return None
