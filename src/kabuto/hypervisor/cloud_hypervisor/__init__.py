"""Cloud Hypervisor backend: REST API over a Unix socket, virtio-fs, hybrid vsock."""

from kabuto.hypervisor.cloud_hypervisor.plugin import CAPABILITIES, CloudHypervisorPlugin, plugin

__all__ = ["CAPABILITIES", "CloudHypervisorPlugin", "plugin"]
