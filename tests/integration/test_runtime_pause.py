"""`kabuto pause`, `resume` and `update` against real QEMU, each command a separate process.

One VM boot: a detached container counts into a file of its (shared, writable) rootfs, which
the host reads directly, so the count can be watched while the container is frozen and `exec`
is refused. Then its cgroup limits are updated and read back from inside the container (it has
a cgroup namespace, so /sys/fs/cgroup is its own cgroup); a paused container is killed, and a
paused pod member deleted with --force. Nothing may be left under the state root.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_runtime_helpers import (
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
    write_bundle,
)

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = pytest.mark.vm

# each step renames a complete file into place: the host never reads half a number
COUNTER = ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /count.new; mv /count.new /count; "
           "sleep 0.1; done"]
SLEEPER = ["sh", "-c", "while :; do sleep 1; done"]
# bounds on waiting for the guest (TCG is slow); never a measure of speed
WAIT_TIMEOUT = 120.0
FROZEN_WATCH = 3.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def status_of(root: Path, container_id: str) -> str:
    return str(json.loads(kabuto(root, "state", container_id, check=True).stdout)["status"])


def read_count(rootfs: Path) -> int | None:
    try:
        return int((rootfs / "count").read_text())
    except (FileNotFoundError, ValueError):
        return None


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_TIMEOUT:g}s"
        time.sleep(0.5)


def in_container(root: Path, container_id: str, path: str) -> str:
    return kabuto(root, "exec", container_id, "cat", path, check=True).stdout.decode().strip()


def failure(root: Path, *args: str, input: bytes | None = None) -> str:
    result = kabuto(root, *args, input=input)
    assert result.returncode != 0, f"kabuto {' '.join(args)} succeeded"
    return result.stderr.decode()


def test_pause_resume_update_kill_delete(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")

    def writable_with_cgroup_namespace(spec: dict[str, Any]) -> None:
        spec["root"]["readonly"] = False
        spec["linux"]["namespaces"].append({"type": "cgroup"})

    bundle = write_bundle(tmp_path / "counter", rootfs, COUNTER, change=writable_with_cgroup_namespace)
    kabuto(state_root, "create", "--bundle", str(bundle), "counter", check=True)
    refused = failure(state_root, "pause", "counter")
    assert "it is created" in refused
    kabuto(state_root, "start", "counter", check=True)
    wait_until(lambda: (read_count(rootfs) or 0) > 0, "the counter starts")

    # paused: the count stands still, exec and a plain delete are refused
    kabuto(state_root, "pause", "counter", check=True)
    assert status_of(state_root, "counter") == "paused"
    frozen_at = read_count(rootfs)
    time.sleep(FROZEN_WATCH)
    assert read_count(rootfs) == frozen_at
    assert "paused" in failure(state_root, "exec", "counter", "true")
    assert "not stopped: paused" in failure(state_root, "delete", "counter")
    assert "it is paused" in failure(state_root, "pause", "counter")
    listed = json.loads(kabuto(state_root, "list", "-f", "json", check=True).stdout)
    assert [(row["id"], row["status"]) for row in listed] == [("counter", "paused")]
    assert read_count(rootfs) == frozen_at

    # resumed: it counts on
    kabuto(state_root, "resume", "counter", check=True)
    assert status_of(state_root, "counter") == "running"
    assert "not paused" in failure(state_root, "resume", "counter")
    wait_until(lambda: (read_count(rootfs) or 0) > (frozen_at or 0), "the counter goes on after resume")

    # update: runc's options and -r JSON, read back inside the container
    kabuto(state_root, "update", "--memory", "64m", "counter", check=True)
    assert in_container(state_root, "counter", "/sys/fs/cgroup/memory.max") == str(64 << 20)
    resources = json.dumps({"memory": {"limit": -1}, "pids": {"limit": 50}}).encode()
    kabuto(state_root, "update", "-r", "-", "counter", input=resources, check=True)
    assert in_container(state_root, "counter", "/sys/fs/cgroup/memory.max") == "max"
    assert in_container(state_root, "counter", "/sys/fs/cgroup/pids.max") == "50"
    refused = failure(state_root, "update", "-r", "-", "counter", input=b'{"blockIO": {"weight": 10}}')
    assert "linux.resources.blockIO is not supported" in refused

    # a pod member paused, then deleted with --force (the guest thaws it to kill it)
    annotations = {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: "counter"}
    member = write_bundle(tmp_path / "member", rootfs, SLEEPER, annotations=annotations)
    kabuto(state_root, "create", "--bundle", str(member), "member", check=True)
    kabuto(state_root, "start", "member", check=True)
    kabuto(state_root, "pause", "member", check=True)
    assert status_of(state_root, "member") == "paused"
    kabuto(state_root, "delete", "--force", "member", check=True)
    assert "does not exist" in failure(state_root, "state", "member")
    assert status_of(state_root, "counter") == "running"

    # a paused container killed: SIGKILL ends it, frozen or not
    kabuto(state_root, "pause", "counter", check=True)
    kabuto(state_root, "kill", "counter", "KILL", check=True)
    wait_until(lambda: status_of(state_root, "counter") == "stopped", "the paused container is killed")
    kabuto(state_root, "delete", "counter", check=True)
    assert "does not exist" in failure(state_root, "state", "counter")
