"""Whether the host offers vhost-net (the QEMU backend's netdev ``vhost`` flag per tap)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEV_VHOST_NET = Path("/dev/vhost-net")


def vhost_net_available(dev: Path = DEV_VHOST_NET) -> bool:
    """True when ``dev`` is a character device this process may open read-write.

    Only a check: the vhost_net module is not loaded for it (a host that wants it loads it),
    and KVM is needed as well (hypervisor/qemu/cmdline.py ``use_vhost_net`` decides)."""
    try:
        mode = dev.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) and os.access(dev, os.R_OK | os.W_OK)
