"""The VirtContainer handler: sandboxes (VMs) holding OCI containers, and their persisted state."""
