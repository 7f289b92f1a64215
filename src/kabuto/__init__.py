"""Kabuto: containers in lightweight VMs, with the VMM chosen by configuration."""

__version__ = "0.1.0"
