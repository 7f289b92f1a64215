"""A minimal container rootfs from the host's static busybox (Debian's busybox-static).

Used by the Python API when no rootfs is given, by ``make demo``, and by the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kabuto.errors import KabutoError

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
LIST_TIMEOUT = 10.0


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise KabutoError("no busybox binary found: install busybox-static (apt-get install busybox-static)")


def make_busybox_rootfs(dest: Path) -> Path:
    """Fill ``dest`` with /bin/busybox, a symlink per applet, and the usual empty directories."""
    busybox = find_busybox()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True,
                             timeout=LIST_TIMEOUT).stdout.split()
    for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "run"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in applets:
        link = dest / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return dest
