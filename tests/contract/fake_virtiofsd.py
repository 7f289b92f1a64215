#!/usr/bin/env python3
"""Test double of virtiofsd: checks its arguments, listens on --socket-path and, like the real
vhost-user daemon, serves exactly one frontend connection and exits when it closes."""

from __future__ import annotations

import os
import socket
import sys

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
    frontend, _ = listener.accept()
    listener.close()
    os.unlink(options["socket-path"])
    record({"virtiofsd": "frontend connected", "pid": os.getpid()})
    while frontend.recv(4096):
        pass
    record({"virtiofsd": "frontend gone, exiting", "pid": os.getpid()})


if __name__ == "__main__":
    main()
