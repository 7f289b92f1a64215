#!/usr/bin/env python3
"""Test double of Firecracker's ``jailer``: checks its arguments and builds the chroot layout
(``<chroot base>/<exec file name>/<id>/root``), then execs the exec file with the forwarded
arguments. Instead of chroot it tells the fake Firecracker its jail via FAKE_JAIL_ROOT.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from fake_common import record

ID_RULE = re.compile(r"[A-Za-z0-9-]{1,64}")


def main() -> None:
    record({"argv": sys.argv, "pid": os.getpid(), "daemon": "jailer"})
    argv = sys.argv[1:]
    forwarded = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="jailer", exit_on_error=False)
    for flag in ("--id", "--exec-file", "--uid", "--gid"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--netns")
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--cgroup-version", default="1")
    parser.add_argument("--parent-cgroup")
    parser.add_argument("--resource-limit", action="append", default=[])
    parser.add_argument("--daemonize", action="store_true")
    parser.add_argument("--new-pid-ns", action="store_true")
    args = parser.parse_args(own)
    if not ID_RULE.fullmatch(args.id):
        sys.exit(f"Invalid instance ID: {args.id}")
    if not args.uid.isdigit() or not args.gid.isdigit():
        sys.exit("Invalid uid or gid")
    if "firecracker" not in os.path.basename(args.exec_file):
        sys.exit(f"Invalid filename: the --exec-file name must contain 'firecracker': {args.exec_file}")
    if not os.path.isfile(args.exec_file):
        sys.exit(f"Failed to canonicalize path {args.exec_file}: No such file or directory")
    if args.netns and not os.path.exists(args.netns):
        sys.exit(f"Failed to open netns {args.netns}")
    root = os.path.join(args.chroot_base_dir, os.path.basename(args.exec_file), args.id, "root")
    os.makedirs(root, exist_ok=True)
    os.chdir(root)
    os.environ["FAKE_JAIL_ROOT"] = root
    os.execv(args.exec_file, [args.exec_file, f"--id={args.id}", *forwarded])


if __name__ == "__main__":
    main()
