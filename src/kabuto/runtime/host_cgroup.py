"""The pod's cgroup on the host, with ``[runtime] sandbox_cgroup_only`` (as Kata's): the process
that creates the sandbox (the shim, or the CLI) joins the cgroup CRI names for the sandbox
container (its ``linux.cgroupsPath``, under kubelet's pod cgroup) before the VMM starts, so the
VMM, virtiofsd and the shim run there and kubelet's pod limits and the RuntimeClass overhead
apply on the host. cgroup v2 (one hierarchy) or v1 (every mounted hierarchy, as runc joins them);
cgroupfs paths only. Leaving moves this process back and removes the directories it made."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from kabuto.errors import KabutoError

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cpuset's files must be filled before a process can join (cgroup v1), as runc copies them
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")


class HostCgroupError(KabutoError):
    """The sandbox's host cgroup cannot be used; the message names it and why."""


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """cgroup v2's single hierarchy, or each v1 hierarchy mounted under ``root`` (aliases such as
    ``cpu -> cpu,cpuacct`` skipped)."""
    if (root / "cgroup.controllers").is_file():
        return [root]
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.is_symlink() and (d / "cgroup.procs").is_file())


def _current(pid: int, hierarchy: Path, root: Path) -> str:
    """The cgroup (path in ``hierarchy``) process ``pid`` is in, from /proc/<pid>/cgroup."""
    v2 = hierarchy == root
    names = set(hierarchy.name.split(","))
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and (set(controllers.split(",")) == names
                                                       or controllers == f"name={hierarchy.name}")):
            return path
    return "/"


def _check(cgroups_path: str) -> Path:
    relative = Path(cgroups_path.lstrip("/"))
    if not cgroups_path.startswith("/") or ":" in cgroups_path or ".." in relative.parts \
            or not relative.parts:
        raise HostCgroupError(f"linux.cgroupsPath {cgroups_path!r}: sandbox_cgroup_only takes an absolute "
                              "cgroupfs path (not a systemd slice:prefix:name)")
    return relative


def join(cgroups_path: str, pid: int, root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """Put process ``pid`` into ``cgroups_path`` in every hierarchy, making what is missing;
    returns what ``leave`` needs (the record keeps it). Undone on failure."""
    relative = _check(cgroups_path)
    record: dict[str, Any] = {"path": cgroups_path, "pid": pid, "created": [], "previous": {}}
    try:
        for hierarchy in hierarchies(root):
            record["previous"][str(hierarchy)] = _current(pid, hierarchy, root)
            directory = hierarchy
            for part in relative.parts:
                directory = directory / part
                if not directory.is_dir():
                    directory.mkdir()
                    record["created"].append(str(directory))
                    for name in CPUSET_FILES:
                        own = directory / name
                        if own.is_file() and not own.read_text().strip():
                            own.write_text((directory.parent / name).read_text())
            (directory / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        leave(record, pid)
        raise HostCgroupError(f"cannot join host cgroup {cgroups_path}: {exc}") from None
    return record


def leave(record: dict[str, Any], pid: int) -> None:
    """Move ``pid`` back where it was, if it is the process that joined, and remove the
    directories ``join`` made (deepest first); one still holding a process stays."""
    for hierarchy, previous in record.get("previous", {}).items() if record.get("pid") == pid else ():
        with contextlib.suppress(OSError):
            (Path(hierarchy) / previous.lstrip("/") / "cgroup.procs").write_text(str(pid))
    for directory in sorted(record.get("created", []), key=lambda d: d.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
