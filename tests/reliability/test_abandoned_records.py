"""Which sandbox records count as left half made by a creator that died (no VM needed): the rule
reap_abandoned applies before every command. test_faults_cli.py and test_faults_api.py kill real
creators under real boots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kabuto.processes import process_record
from kabuto.runtime.sandbox import reap_abandoned
from kabuto.runtime.state import ContainerRecord, SandboxRecord, StateStore


@pytest.fixture
def dead_creator() -> dict[str, float]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = process_record(process.pid)
    process.kill()
    process.wait()
    return record


def record(creator: dict[str, float], status: str, containers: int = 0) -> SandboxRecord:
    made = {f"c{i}": ContainerRecord(id=f"c{i}", bundle="") for i in range(containers)}
    return SandboxRecord(id="sb", hypervisor_name="qemu", config_path=None, status=status, creator=creator,
                         containers=made)


def test_only_unfinished_records_of_dead_creators_are_abandoned(dead_creator: dict[str, float]) -> None:
    alive = process_record(os.getpid())
    assert record(dead_creator, "creating").abandoned()
    assert record(dead_creator, "ready").abandoned()  # booted, but its first container never made
    assert not record(dead_creator, "ready", containers=1).abandoned()  # a `run` killed mid-stream
    assert not record(alive, "creating").abandoned()  # still at it
    assert not record({}, "creating").abandoned()  # made before creators were recorded: unknown


async def test_reaping_removes_the_record_and_reports_it(tmp_path: Path, dead_creator: dict[str, float],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path)
    store.reserve(record(dead_creator, "creating"), ["sb"])
    (store.jailer_root / "sb").mkdir(parents=True)
    assert await reap_abandoned(store) == ["sb"]
    assert sorted(os.listdir(tmp_path)) == [".lock", ".vm"] and not os.listdir(store.jailer_root)
    assert f"sandbox 'sb' was left half created by pid {dead_creator['pid']}" in caplog.text
    assert await reap_abandoned(store) == []
