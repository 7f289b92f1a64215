"""The storage benchmark's pure pieces: the tree tarball, the configuration, the stamp parsing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from kabuto.bench import storage
from kabuto.config.loader import load_config


def test_tree_tarball_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    first = storage.write_tree_tarball(tmp_path / "a.tar").read_bytes()
    assert storage.write_tree_tarball(tmp_path / "b.tar").read_bytes() == first
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    files = [m for m in members if m.isfile()]
    assert len(files) == storage.TREE_DIRS * storage.TREE_FILES_PER_DIR
    assert len(members) - len(files) == storage.TREE_DIRS
    assert all(m.size < storage.TREE_MAX_FILE_SIZE for m in files)
    assert len({m.size for m in files}) > len(files) // 2


@pytest.mark.parametrize("kind", storage.SHARED_FS_KINDS)
def test_config_sets_the_shared_fs(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(storage.config_with_shared_fs(kind))
    assert load_config(path).hypervisor["qemu"].shared_fs == kind


def adjtimex_output(seconds: float) -> str:
    whole = int(seconds)
    usec = round((seconds - whole) * 1e6)
    return (f"    mode:         0\n    time.tv_sec:  {whole}\n    time.tv_usec: {usec}\n"
            "    return value: 5 (clock not synchronized)\n")


def test_step_seconds_takes_a_stamps_cost_off_each_step() -> None:
    stamps = [100.0, 100.25, 102.25, 102.5, 110.0, 111.0]
    steps = storage.step_seconds("".join(map(adjtimex_output, stamps)).encode())
    assert steps == pytest.approx([1.75, 0.0, 7.25, 0.75])


def test_step_seconds_refuses_a_short_output() -> None:
    with pytest.raises(RuntimeError, match="clock stamps"):
        storage.step_seconds(adjtimex_output(1.0).encode())
