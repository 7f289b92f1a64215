"""The sandbox's host cgroup (sandbox_cgroup_only) on a stand-in cgroup v1 tree: joined in every
hierarchy, left with what it made removed; paths it cannot take are refused by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kabuto.runtime import host_cgroup
from kabuto.runtime.host_cgroup import HostCgroupError, hierarchies, join, leave


def fake_v1(root: Path) -> Path:
    for name in ("memory", "pids", "cpu,cpuacct"):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    (root / "cpu").symlink_to("cpu,cpuacct")  # an alias, as systemd mounts it
    (root / "kubepods").mkdir()  # not a hierarchy: no cgroup.procs
    return root


def test_join_makes_the_path_in_every_hierarchy_and_leave_removes_only_that(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v1(tmp_path / "cgroup")

    real_rmdir = os.rmdir

    def cgroupfs_rmdir(path: str) -> None:  # cgroupfs removes a directory with its control files
        Path(path, "cgroup.procs").unlink(missing_ok=True)
        real_rmdir(path)

    monkeypatch.setattr(host_cgroup.os, "rmdir", cgroupfs_rmdir)
    assert [h.name for h in hierarchies(root)] == ["cpu,cpuacct", "memory", "pids"]
    (root / "memory" / "pod1").mkdir()  # kubelet's pod cgroup exists in one hierarchy
    record = join("/pod1/sandbox", os.getpid(), root)
    for hierarchy in ("memory", "pids", "cpu,cpuacct"):
        assert (root / hierarchy / "pod1" / "sandbox" / "cgroup.procs").read_text() == str(os.getpid())
    leave(record, os.getpid())
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and not p.is_symlink()) == \
        ["cpu,cpuacct", "kubepods", "memory", "memory/pod1", "pids"]


@pytest.mark.parametrize("path", ["relative/path", "system.slice:cri:abc", "/a/../b", "/"])
def test_paths_it_cannot_take_are_refused_by_name(tmp_path: Path, path: str) -> None:
    root = fake_v1(tmp_path / "cgroup")
    with pytest.raises(HostCgroupError, match="cgroupfs path"):
        join(path, os.getpid(), root)
    assert sorted((root / "memory").iterdir()) == [root / "memory" / "cgroup.procs"]
