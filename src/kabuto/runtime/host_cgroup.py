"""Host cgroups at ``linux.cgroupsPath``. cgroup v2 (one hierarchy) or v1 (every mounted
hierarchy, as runc joins them); cgroupfs paths (a systemd ``slice:prefix:name`` is mapped first,
runtime/cgroups_path.py).

* ``join``: the pod's cgroup with ``[runtime] sandbox_cgroup_only`` (as Kata's): the process that
  creates the sandbox (the shim, or the CLI) joins the cgroup CRI names for the sandbox container
  before the VMM starts, so the VMM, virtiofsd and the shim run there and kubelet's pod limits and
  the RuntimeClass overhead apply on the host. Leaving moves this process back and removes the
  directories it made.
* ``place_container``: a container the CLI creates (``runc create``), as Kata places a container
  without sandbox_cgroup_only: the cgroup is made where runc makes it (an absolute path from the
  hierarchy's root, a relative one below the creator's own cgroup), the container's CPU and pids
  limits are written there as runc writes them, the host process standing for the container
  (runtime/monitor.py) joins every hierarchy, and the VMM's vCPU threads join the cpu and cpuset
  ones (cgroup v1; v2 moves whole processes only), so the CPU limits bound the guest's compute.
  Memory limits stay in the guest: the VM's memory is fixed at boot, and a host limit of the
  container's size on the VMM would have the host OOM killer end the whole VM.
  ``remove_container`` removes what it made once those processes are gone (``delete``)."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path
from typing import Any

from kabuto.errors import KabutoError

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cpuset's files must be filled before a process can join (cgroup v1), as runc copies them
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")
# how long a container's host cgroup may stay busy after its processes were told to end
REMOVE_TIMEOUT = 10.0


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
    v2 = _v2(hierarchy, root)
    names = set(hierarchy.name.split(","))
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and (set(controllers.split(",")) == names
                                                       or controllers == f"name={hierarchy.name}")):
            return path
    return "/"


def _v2(hierarchy: Path, root: Path) -> bool:
    return hierarchy == root or hierarchy.name == "unified"


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


def _limits(resources: dict[str, Any], v2: bool) -> dict[str, list[tuple[str, str]]]:
    """controller -> the files runc writes for ``linux.resources``' cpu and pids, in order
    (a period before what is measured against it)."""
    cpu = resources.get("cpu") or {}
    pids = resources.get("pids") or {}
    out: dict[str, list[tuple[str, str]]] = {"cpu": [], "cpuset": [], "pids": []}
    if v2:
        if cpu.get("shares"):
            out["cpu"].append(("cpu.weight", str(1 + ((int(cpu["shares"]) - 2) * 9999) // 262142)))
        if cpu.get("quota") or cpu.get("period"):
            quota, period = int(cpu.get("quota") or 0), int(cpu.get("period") or 100000)
            out["cpu"].append(("cpu.max", f"{quota if quota > 0 else 'max'} {period}"))
    else:
        for key, name in (("shares", "cpu.shares"), ("period", "cpu.cfs_period_us"),
                          ("quota", "cpu.cfs_quota_us"), ("realtimePeriod", "cpu.rt_period_us"),
                          ("realtimeRuntime", "cpu.rt_runtime_us")):
            if cpu.get(key):
                out["cpu"].append((name, str(int(cpu[key]))))
    for key in ("cpus", "mems"):
        if cpu.get(key):
            out["cpuset"].append((f"cpuset.{key}", str(cpu[key])))
    if "limit" in pids:
        out["pids"].append(("pids.max", str(pids["limit"]) if int(pids["limit"]) > 0 else "max"))
    return out


def container_dir(cgroups_path: str, hierarchy: Path, root: Path = CGROUP_ROOT,
                  pid: int | None = None) -> Path:
    """Where runc puts ``cgroups_path`` in ``hierarchy``: from its root when absolute, else below
    the cgroup process ``pid`` (this one) is in."""
    relative = Path(cgroups_path.lstrip("/"))
    if ":" in cgroups_path or ".." in relative.parts or not relative.parts:
        raise HostCgroupError(f"linux.cgroupsPath {cgroups_path!r}: not a cgroupfs path")
    if cgroups_path.startswith("/"):
        return hierarchy / relative
    return hierarchy / _current(pid or os.getpid(), hierarchy, root).lstrip("/") / relative


def place_container(cgroups_path: str, resources: dict[str, Any], pids: list[int], threads: list[int],
                    root: Path = CGROUP_ROOT) -> dict[str, Any]:
    """Make the container's host cgroup, write its CPU and pids limits, move ``pids`` (whole
    processes) into every hierarchy and ``threads`` (single tasks) into the cpu and cpuset ones.
    Returns what ``remove_container`` needs; undone on failure."""
    record: dict[str, Any] = {"path": cgroups_path, "created": [], "threads_moved": bool(threads)}
    try:
        for hierarchy in hierarchies(root):
            v2 = _v2(hierarchy, root)
            directory = container_dir(cgroups_path, hierarchy, root)
            inner = directory.relative_to(hierarchy)
            for parent in [*reversed(inner.parents), inner][1:]:  # from the top, without "."
                path = hierarchy / parent
                if not path.is_dir():
                    path.mkdir()
                    record["created"].append(str(path))
                    for name in CPUSET_FILES:
                        own = path / name
                        if own.is_file() and not own.read_text().strip():
                            own.write_text((path.parent / name).read_text())
            names = set(hierarchy.name.split(","))
            for controller, files in _limits(resources, v2).items():
                if v2 or controller in names:
                    for name, value in files:
                        if v2 and not (directory / name).exists():
                            continue  # a controller the v2 parent does not delegate
                        (directory / name).write_text(value)
            for pid in pids:
                (directory / "cgroup.procs").write_text(str(pid))
            if not v2 and names & {"cpu", "cpuset"}:
                for tid in threads:
                    (directory / "tasks").write_text(str(tid))
    except OSError as exc:
        remove_container(record)
        raise HostCgroupError(f"cannot place the container in host cgroup {cgroups_path}: {exc}") from None
    return record


def remove_container(record: dict[str, Any], timeout: float = REMOVE_TIMEOUT) -> list[str]:
    """Remove the directories ``place_container`` made (deepest first); returns those still
    holding a task after ``timeout`` (they stay). A VMM that was just told to stop may still be
    ending its vCPU threads: a busy directory is retried until then."""
    left = []
    deadline = time.monotonic() + timeout
    for directory in sorted(record.get("created", []), key=lambda d: d.count("/"), reverse=True):
        while True:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                left.append(directory)
            break
    return left
