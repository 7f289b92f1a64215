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


def test_a_cli_container_is_placed_as_runc_places_it_with_cpu_and_pids_limits_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v1(tmp_path / "cgroup")
    (root / "cpuset").mkdir()
    (root / "cpuset" / "cgroup.procs").write_text("")
    real_rmdir = os.rmdir

    def cgroupfs_rmdir(path: str) -> None:
        for control in Path(path).iterdir():
            control.unlink()
        real_rmdir(path)

    monkeypatch.setattr(host_cgroup.os, "rmdir", cgroupfs_rmdir)
    resources = {"cpu": {"shares": 2048, "period": 500000, "quota": 50000, "realtimePeriod": 1000000,
                         "realtimeRuntime": 950000, "cpus": "0", "mems": "0"},
                 "pids": {"limit": 1000}, "memory": {"limit": 50 << 20}}
    record = host_cgroup.place_container("/a/cgrouptest", resources, [4242], [4300, 4301], root)
    cpu = root / "cpu,cpuacct" / "a" / "cgrouptest"
    assert {f.name: f.read_text() for f in cpu.iterdir()} == {
        "cpu.shares": "2048", "cpu.cfs_period_us": "500000", "cpu.cfs_quota_us": "50000",
        "cpu.rt_period_us": "1000000", "cpu.rt_runtime_us": "950000",
        "cgroup.procs": "4242", "tasks": "4301"}  # a stand-in file keeps the last write
    assert (root / "cpuset" / "a" / "cgrouptest" / "cpuset.cpus").read_text() == "0"
    assert (root / "pids" / "a" / "cgrouptest" / "pids.max").read_text() == "1000"
    assert not (root / "pids" / "a" / "cgrouptest" / "tasks").exists()  # vCPU threads: cpu, cpuset
    assert sorted(f.name for f in (root / "memory" / "a" / "cgrouptest").iterdir()) == ["cgroup.procs"]
    assert host_cgroup.remove_container(record) == []
    assert not any((root / h / "a").exists() for h in ("memory", "pids", "cpu,cpuacct", "cpuset"))


def test_a_relative_cgroups_path_is_below_the_creators_own_cgroup(tmp_path: Path) -> None:
    root = fake_v1(tmp_path / "cgroup")
    own = host_cgroup._current(os.getpid(), root / "pids", root)
    assert host_cgroup.container_dir("x/y", root / "pids", root) == \
        root / "pids" / own.lstrip("/") / "x" / "y"
    assert host_cgroup.container_dir("/x/y", root / "pids", root) == root / "pids" / "x" / "y"
    with pytest.raises(HostCgroupError, match="not a cgroupfs path"):
        host_cgroup.place_container("/a/../b", {}, [1], [], root)
    assert sorted((root / "pids").iterdir()) == [root / "pids" / "cgroup.procs"]
