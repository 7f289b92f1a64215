"""``linux.cgroupsPath`` as runc reads it: a cgroupfs path, or with ``--systemd-cgroup``
systemd's ``slice:prefix:name``.

Kabuto's containers live in cgroups inside the VM (the guest applies ``linux.resources``). The
path is checked as runc checks it (a malformed one fails ``create`` as under runc) and mapped to
the cgroupfs path where ``kabuto create`` places the container's host side
(runtime/host_cgroup.py ``place_container``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from kabuto.errors import KabutoError

logger = logging.getLogger(__name__)


class CgroupsPathError(KabutoError):
    """linux.cgroupsPath does not have the form the cgroup manager expects."""


def systemd_running() -> bool:
    """sd_booted(): systemd is the init of this host."""
    return Path("/run/systemd/system").is_dir()


def host_cgroup(cgroups_path: str, *, systemd: bool) -> str:
    """The cgroup path (relative to the hierarchy's root) runc would use for ``cgroups_path``.

    With ``systemd`` and a host that runs systemd, ``slice:prefix:name`` becomes
    ``<slice path>/<prefix>-<name>.scope``; elsewhere the path is cgroupfs's (runc's
    ``--systemd-cgroup`` needs systemd; Kabuto falls back to cgroupfs and says so)."""
    if not systemd:
        return cgroups_path
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise CgroupsPathError(f"expected cgroupsPath to be of format \"slice:prefix:name\" for systemd "
                               f"cgroups, got {cgroups_path!r} instead")
    slice_name, prefix, name = parts
    if not systemd_running():
        logger.warning("--systemd-cgroup: this host does not run systemd; cgroupsPath %r is read as "
                       "cgroupfs's /%s/%s-%s", cgroups_path, slice_name or "system.slice", prefix, name)
        return f"/{slice_name or 'system.slice'}/{prefix}-{name}"
    return f"{_expand_slice(slice_name or 'system.slice')}/{prefix}-{name}.scope"


def _expand_slice(slice_name: str) -> str:
    """systemd's nesting: a-b-c.slice lives in a.slice/a-b.slice/a-b-c.slice."""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise CgroupsPathError(f"invalid slice name {slice_name!r} in cgroupsPath")
    if slice_name == "-.slice":
        return ""
    stem = slice_name.removesuffix(".slice")
    if stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise CgroupsPathError(f"invalid slice name {slice_name!r} in cgroupsPath")
    pieces = stem.split("-")
    return "/" + "/".join("-".join(pieces[:i + 1]) + ".slice" for i in range(len(pieces)))


def spec_cgroups_path(spec: dict[str, object], *, systemd: bool) -> str | None:
    """The spec's cgroupsPath, checked, as a cgroupfs path; None without one."""
    linux = spec.get("linux")
    cgroups_path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not cgroups_path:
        return None
    if not isinstance(cgroups_path, str):
        raise CgroupsPathError("linux.cgroupsPath must be a string")
    return host_cgroup(cgroups_path, systemd=systemd)
