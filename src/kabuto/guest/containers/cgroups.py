"""Cgroups in the guest: a container's cgroup v2 directory, its limits, freezing and usage figures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from kabuto.guest.containers.deadlines import deadline_within
from kabuto.guest.containers.spec import ContainerSpec
from kabuto.ttrpc import Code, RpcError

log = logging.getLogger(__name__)

CGROUP_PARENT = "kabuto"
CGROUP_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
# Pause: the kernel reports the whole cgroup frozen within this, or the pause is undone.
FREEZE_TIMEOUT = 10.0
FREEZE_POLL = 0.01


def create_cgroup(cgroup_root: Path, container_id: str, spec: ContainerSpec) -> Path | None:
    """The container's cgroup v2 directory with its limits; None without cgroup v2."""
    files = dict(spec.resources.files)
    available = _read_words(cgroup_root / "cgroup.controllers")
    if available is None:
        if files:
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"config.json: linux.resources sets {', '.join(files)} but the guest has no cgroup v2",
            )
        return None
    parent = cgroup_root / CGROUP_PARENT
    wanted = [c for c in CGROUP_CONTROLLERS if c in available]
    try:
        parent.mkdir(exist_ok=True)
        for directory in (cgroup_root, parent):
            for controller in wanted:
                with contextlib.suppress(OSError):  # one missing controller must not stop the others
                    (directory / "cgroup.subtree_control").write_text(f"+{controller}")
        cgroup = parent / container_id
        with contextlib.suppress(OSError):  # an empty one left by an earlier container of that id
            cgroup.rmdir()
        cgroup.mkdir()
    except OSError as exc:
        if files:
            raise RpcError(Code.INTERNAL, f"cannot create the container's cgroup: {exc}") from None
        log.warning("no cgroup for container %s: %s", container_id, exc)
        return None
    try:
        write_limits(cgroup, files, "config.json: ")
    except BaseException:
        remove_cgroup(cgroup)
        raise
    return cgroup


def remove_cgroup(cgroup: Path | None) -> None:
    if cgroup is None:
        return
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove cgroup %s: %s", cgroup, exc)


def cgroup_of(container_id: str, cgroup_dir: Path | None, action: str) -> Path:
    """The cgroup an action on the container needs, which a guest without cgroup v2 lacks."""
    if cgroup_dir is None:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"cannot {action} container {container_id!r}: it has no cgroup (the guest has no cgroup v2)",
        )
    return cgroup_dir


async def set_frozen(container_id: str, cgroup_dir: Path | None, frozen: bool) -> None:
    """Write cgroup.freeze, then wait (bounded) until cgroup.events reports the new state."""
    action = "pause" if frozen else "resume"
    cgroup = cgroup_of(container_id, cgroup_dir, action)
    wanted = int(frozen)
    try:
        (cgroup / "cgroup.freeze").write_text(str(wanted))
    except OSError as exc:
        raise RpcError(
            Code.FAILED_PRECONDITION,
            f"cannot {action} container {container_id!r}: cgroup.freeze: {exc.strerror or exc}",
        ) from None
    loop = asyncio.get_running_loop()
    deadline = deadline_within(FREEZE_TIMEOUT)
    while _read_flat_keyed(cgroup / "cgroup.events").get("frozen") != wanted:
        if loop.time() >= deadline:
            raise RpcError(
                Code.UNAVAILABLE,
                f"cannot {action} container {container_id!r}: its cgroup did not report "
                f"frozen {wanted} within {FREEZE_TIMEOUT:g}s",
            )
        await asyncio.sleep(FREEZE_POLL)


def write_limits(cgroup: Path, files: dict[str, str], context: str) -> None:
    """Write linux.resources' cgroup v2 files (parse_resources' mapping) into ``cgroup``."""
    enabled = _read_words(cgroup / "cgroup.controllers") or set()
    for name, value in files.items():
        controller = name.partition(".")[0]
        if controller not in enabled:
            raise RpcError(
                Code.INVALID_ARGUMENT,
                f"{context}linux.resources needs the {controller} cgroup controller, "
                "which the guest kernel does not offer",
            )
        try:
            (cgroup / name).write_text(value)
        except OSError as exc:
            raise RpcError(
                Code.INVALID_ARGUMENT, f"{context}cannot set {name} to {value!r}: {exc.strerror or exc}"
            ) from None


def lifted_limits(resources: Any) -> dict[str, str]:
    """An update's -1 lifts a memory or pids limit, as ``runc update`` does (at creation
    parse_resources skips -1: no limit is there to lift)."""
    files = {}
    if isinstance(resources, dict):
        for section, key, name in (("memory", "limit", "memory.max"), ("pids", "limit", "pids.max")):
            values = resources.get(section)
            if isinstance(values, dict) and values.get(key) == -1:
                files[name] = "max"
    return files


def cgroup_stats(cgroup: Path) -> dict[str, int]:
    """StatsContainerResponse's fields the cgroup's files report (the others stay unset)."""
    stats = {}
    values = _read_flat_keyed(cgroup / "cpu.stat")
    for key in ("usage_usec", "user_usec", "system_usec"):
        if key in values:
            stats[f"cpu_{key}"] = values[key]
    for field_name, file_name in (
        ("memory_usage_bytes", "memory.current"),
        ("memory_limit_bytes", "memory.max"),
        ("pids_current", "pids.current"),
        ("pids_limit", "pids.max"),
    ):
        value = _read_number(cgroup / file_name)
        if value is not None:
            stats[field_name] = value
    events = _read_flat_keyed(cgroup / "memory.events")
    if "oom_kill" in events:
        stats["memory_oom_kills"] = events["oom_kill"]
    return stats


def _read_words(path: Path) -> set[str] | None:
    try:
        return set(path.read_text().split())
    except OSError:
        return None


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_flat_keyed(path: Path) -> dict[str, int]:
    values = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
    return values
