"""QEMU backend: the default VMM, driven through QMP (qemu.qmp)."""

from kabuto.hypervisor.qemu.plugin import QemuPlugin, plugin

__all__ = ["QemuPlugin", "plugin"]
