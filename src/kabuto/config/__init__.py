"""Configuration: TOML (Kata runtime-rs compatible), drop-ins, plugins, annotations."""

from kabuto.config.model import AgentConfig, FactoryConfig, HypervisorConfig, KabutoConfig, RuntimeConfig

__all__ = ["AgentConfig", "FactoryConfig", "HypervisorConfig", "KabutoConfig", "RuntimeConfig"]
