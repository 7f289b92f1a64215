#!/usr/bin/env python3
"""Test double of virtiofsd: checks its arguments, listens on --socket-path, runs until killed."""

from __future__ import annotations

import os
import socket
import sys
import time

from fake_common import record


def main() -> None:
    record({"argv": sys.argv, "pid": os.getpid(), "daemon": "virtiofsd"})
    options = dict(
        arg.removeprefix("--").split("=", 1) for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg
    )
    if "socket-path" not in options or "shared-dir" not in options:
        sys.exit("virtiofsd: --socket-path and --shared-dir are required")
    if not os.path.isdir(options["shared-dir"]):
        sys.exit(f"virtiofsd: shared directory {options['shared-dir']} does not exist")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(options["socket-path"])
    listener.listen(1)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
