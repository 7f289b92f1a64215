"""Configuration: TOML (Kata runtime-rs compatible), drop-ins, annotations; data and rules on data.

The hypervisor plugins adjust and validate it afterwards (kabuto.hypervisor.resolve).
"""

from kabuto.config.loader import config_path, load_config
from kabuto.config.model import AgentConfig, FactoryConfig, HypervisorConfig, KabutoConfig, RuntimeConfig
from kabuto.config.rules import HypervisorNames

__all__ = [
    "AgentConfig",
    "FactoryConfig",
    "HypervisorConfig",
    "HypervisorNames",
    "KabutoConfig",
    "RuntimeConfig",
    "config_path",
    "load_config",
]
