"""What a sandbox can leave on the host, counted: processes (and the fds they hold open), this
process's open fds and threads, mounts, unix sockets, taps and tc filters in a pod netns, cgroups,
files and directories.

Counts are scoped to what the test owns (its state root, its temporary directory, its netns,
this process and its children), so other work on the machine does not move them.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Scope:
    state_root: Path
    temp_dir: Path
    netns: str | None = None


def count(scope: Scope) -> dict[str, int]:
    me = psutil.Process()
    root = str(scope.state_root)
    naming: list[psutil.Process] = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(root in arg for arg in process.info.get("cmdline") or []) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                naming.append(process)
        except psutil.Error:
            continue
    children = [c for c in me.children(recursive=True) if _alive(c)]
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo]
    with open("/proc/net/unix") as unix:
        sockets = [line.split()[-1] for line in unix.readlines()[1:] if len(line.split()) >= 8]
    counts = {
        "processes naming the state root": len(naming),
        # a running sandbox's VMM, virtiofsd and the container's monitor: what each holds open
        "open fds of processes naming the state root": sum(_fds(process) for process in naming),
        "child processes": len(children),
        "open fds": len(os.listdir("/proc/self/fd")),
        # asyncio's default executor keeps up to min(32, cpus + 4) idle workers for reuse: a
        # pool, not a leak; every other thread counts
        "threads (not asyncio's worker pool)": sum(not t.name.startswith("asyncio_")
                                                    for t in threading.enumerate()),
        "mounts below the state root": sum(m.startswith(root) for m in mounts),
        "mounts below the temporary directory": sum(m.startswith(str(scope.temp_dir)) for m in mounts),
        "unix sockets below the state root": sum(s.startswith(root) for s in sockets),
        "paths below the state root": sum(1 for _ in scope.state_root.rglob("*")),
        "paths in the temporary directory": sum(1 for _ in scope.temp_dir.rglob("*")),
        "cgroups naming kabuto": sum(1 for p in CGROUP_ROOT.rglob("*kabuto*") if p.is_dir()),
    }
    if scope.netns is not None:
        counts["links in the pod netns"] = len(_ip("-n", scope.netns, "-o", "link", "show").splitlines())
        counts["tc filters in the pod netns"] = sum(
            len(_tc(scope.netns, "filter", "show", "dev", link, "ingress").splitlines())
            for link in _links(scope.netns))
        counts["qdiscs in the pod netns"] = len(_tc(scope.netns, "qdisc", "show").splitlines())
    return counts


def _fds(process: psutil.Process) -> int:
    try:
        return process.num_fds()
    except psutil.Error:  # ended meanwhile
        return 0


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _links(netns: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0]
            for line in _ip("-n", netns, "-o", "link", "show").splitlines()]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def _tc(netns: str, *args: str) -> str:
    return subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True, check=False,
                          timeout=30).stdout


def differences(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {name: (before[name], after[name]) for name in before if before[name] != after[name]}
