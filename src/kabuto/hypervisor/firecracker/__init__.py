"""Firecracker backend: REST API over a Unix socket, optional jailer, hybrid vsock, no hot-plug."""

from kabuto.hypervisor.firecracker.plugin import CAPABILITIES, FirecrackerPlugin, plugin

__all__ = ["CAPABILITIES", "FirecrackerPlugin", "plugin"]
