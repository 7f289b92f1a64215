"""What pod networking needs from the host: tap devices (/dev/net/tun), and vhost-net where the
host offers it (the QEMU backend's netdev ``vhost`` flag per tap)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DEV_VHOST_NET = Path("/dev/vhost-net")
DEV_TUN = Path("/dev/net/tun")


def host_facts(tun: Path = DEV_TUN, vhost: Path = DEV_VHOST_NET) -> list[str]:
    """What ``kabuto check`` says of networking here (tc and netlink go through pyroute2: no
    binaries are needed)."""
    return [
        f"tap devices: {tun} present" if _char_device(tun)
        else f"tap devices: {tun} missing: a pod's interfaces cannot reach the VM",
        f"vhost-net: {vhost} present (used with KVM)" if vhost_net_available(vhost)
        else f"vhost-net: {vhost} missing: QEMU moves packets itself (slower)",
    ]


def _char_device(dev: Path) -> bool:
    try:
        return stat.S_ISCHR(dev.stat().st_mode) and os.access(dev, os.R_OK | os.W_OK)
    except OSError:
        return False


def vhost_net_available(dev: Path = DEV_VHOST_NET) -> bool:
    """True when ``dev`` is a character device this process may open read-write.

    Only a check: the vhost_net module is not loaded for it (a host that wants it loads it),
    and KVM is needed as well (hypervisor/qemu/cmdline.py ``use_vhost_net`` decides)."""
    return _char_device(dev)
