"""Kata's VM factory: VMs made before a sandbox asks for one (template clones, a cache daemon's
booted VMs), handed to VirtSandbox.create, which boots cold when none is to be had."""
