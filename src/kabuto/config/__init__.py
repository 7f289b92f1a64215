"""Configuration: TOML (Kata runtime-rs compatible), drop-ins, plugins, annotations."""

from kabuto.config.loader import config_path, hypervisor_table, load_config
from kabuto.config.model import AgentConfig, FactoryConfig, HypervisorConfig, KabutoConfig, RuntimeConfig

__all__ = [
    "AgentConfig",
    "FactoryConfig",
    "HypervisorConfig",
    "KabutoConfig",
    "RuntimeConfig",
    "config_path",
    "hypervisor_table",
    "load_config",
]
