"""The runc-like CLI against real QEMU, each command a separate process as OCI tooling runs it.

One VM serves the whole lifecycle (TCG boots are slow): a sandbox container, containers that
join it as a pod (CRI annotations), exec, kill, delete, bad ids, and at the end the VMM
killed under running containers. Every test checks that nothing is left: no process, mount,
socket or directory under its state root.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_runtime_helpers import (
    busybox_rootfs,
    kabuto,
    require_guest_image,
    runtime_leftovers,
    state_root_fixture,
    write_bundle,
)

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = pytest.mark.vm

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
VMM_EXIT_TIMEOUT = 30.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def state_of(root: Path, container_id: str) -> dict[str, object]:
    result = kabuto(root, "state", container_id, check=True)
    return json.loads(result.stdout)


def test_bad_bundles_fail_clearly_and_leave_nothing(state_root: Path, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    cases = {
        "no-config": (tmp_path / "empty", "config.json not found"),
        "bad-json": (tmp_path / "badjson", "not valid JSON"),
        "no-rootfs": (write_bundle(tmp_path / "norootfs", tmp_path / "absent", ["true"]), "does not exist"),
        "hooks": (write_bundle(tmp_path / "hooks", rootfs, ["true"],
                               change=lambda s: s.update(hooks={"prestart": [{"path": "/bin/true"}]})),
                  "hooks: not supported"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    for container_id, (bundle, message) in cases.items():
        for command in (["create", "--bundle", str(bundle), container_id],
                        ["run", "-b", str(bundle), container_id]):
            result = kabuto(state_root, *command)
            assert result.returncode == 1, (command, result)
            assert message in result.stderr.decode(), (command, result.stderr)
            assert not runtime_leftovers(state_root)
    for command in (["start", "ghost"], ["state", "ghost"], ["kill", "ghost"], ["delete", "ghost"],
                    ["exec", "ghost", "true"], ["ps", "ghost"]):
        result = kabuto(state_root, *command)
        # as runc's: a failed exec exits 255 (the lower codes are the process's)
        assert result.returncode == (255 if command[0] == "exec" else 1)
        assert "container 'ghost' does not exist" in result.stderr.decode()
    result = kabuto(state_root, "list", "--format", "json", check=True)
    assert json.loads(result.stdout) == []


def test_lifecycle_pod_and_crashed_vmm(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "marker").write_text("shared from the host\n")
    pod = write_bundle(tmp_path / "pod", rootfs, SLEEPER, change=lambda s: s.update(hostname="podhost"))

    kabuto(state_root, "create", "--bundle", str(pod), "pod", check=True)
    state = state_of(state_root, "pod")
    assert state["status"] == "created" and state["bundle"] == str(pod) and state["id"] == "pod"
    # the pid is the host process standing for the container (not the VMM), as runc's init
    monitor_pid = int(state["pid"])  # type: ignore[call-overload]
    assert "kabuto.runtime.monitor" in psutil.Process(monitor_pid).cmdline()
    vmm_pid, = [p.pid for p in psutil.process_iter(["name", "cmdline"]) if "qemu" in (p.info["name"] or "")
                and any(str(state_root) in arg for arg in p.info["cmdline"] or [])]
    assert psutil.pid_exists(vmm_pid)
    # the VMM and the monitor are in sessions of their own: they outlived `kabuto create`
    assert os.getsid(vmm_pid) == vmm_pid and os.getsid(monitor_pid) == monitor_pid

    kabuto(state_root, "start", "pod", check=True)
    assert state_of(state_root, "pod")["status"] == "running"

    # exec: the guest's kernel, not the host's; the host's rootfs file through the share
    result = kabuto(state_root, "exec", "pod", "uname", "-r", check=True)
    assert result.stdout.strip() and result.stdout.decode().strip() != platform.release()
    assert kabuto(state_root, "exec", "pod", "cat", "/marker", check=True).stdout == b"shared from the host\n"
    assert kabuto(state_root, "exec", "pod", "hostname", check=True).stdout == b"podhost\n"
    assert kabuto(state_root, "exec", "pod", "sh", "-c", "exit 7").returncode == 7
    assert kabuto(state_root, "exec", "pod", "sh", "-c", "kill -KILL $$").returncode == 128 + signal.SIGKILL
    piped = kabuto(state_root, "exec", "pod", "sh", "-c", "cat; echo done >&2", input=b"in\n")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, b"in\n", b"done\n")
    pids = json.loads(kabuto(state_root, "ps", "--format", "json", "pod", check=True).stdout)
    assert pids and all(isinstance(pid, int) for pid in pids)

    # a second container joins the same VM
    annotations = {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: "pod"}
    app = write_bundle(tmp_path / "app", rootfs, SLEEPER, annotations=annotations,
                       change=lambda s: s.update(hostname="apphost"))
    kabuto(state_root, "create", "-b", str(app), "app", check=True)
    duplicate = kabuto(state_root, "create", "-b", str(app), "app")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr.decode()
    kabuto(state_root, "start", "app", check=True)
    app_pid = state_of(state_root, "app")["pid"]
    assert app_pid not in (monitor_pid, vmm_pid) and psutil.pid_exists(int(app_pid))  # type: ignore[call-overload]
    assert kabuto(state_root, "exec", "app", "hostname", check=True).stdout == b"apphost\n"
    listed = json.loads(kabuto(state_root, "list", "-f", "json", check=True).stdout)
    assert {row["id"]: row["status"] for row in listed} == {"pod": "running", "app": "running"}

    # kill: SIGTERM reaches the trap; a stopped container can be deleted
    refused = kabuto(state_root, "delete", "app")
    assert refused.returncode == 1 and "not stopped" in refused.stderr.decode()
    kabuto(state_root, "kill", "app", "TERM", check=True)
    deadline = time.monotonic() + 30
    while state_of(state_root, "app")["status"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state_of(state_root, "app")["status"] == "stopped"
    kabuto(state_root, "delete", "app", check=True)
    assert kabuto(state_root, "state", "app").returncode == 1

    # a third container, then the VMM dies under both running containers
    kabuto(state_root, "create", "-b", str(app), "app2", check=True)
    kabuto(state_root, "start", "app2", check=True)
    os.kill(vmm_pid, signal.SIGKILL)
    deadline = time.monotonic() + VMM_EXIT_TIMEOUT
    while psutil.pid_exists(vmm_pid) and psutil.Process(vmm_pid).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    for container_id in ("pod", "app2"):
        state = state_of(state_root, container_id)
        assert (state["status"], state["pid"]) == ("stopped", 0)
    # noticing the death released the host side: no VMM, no mount, no VM directory
    released = [entry for entry in runtime_leftovers(state_root)
                if entry.startswith(("process", "mount")) or "/.vm/" in entry or "/shared/" in entry]
    assert not released
    failed = kabuto(state_root, "exec", "app2", "true")
    assert failed.returncode == 255 and "VM is gone" in failed.stderr.decode()
    kabuto(state_root, "delete", "app2", check=True)
    kabuto(state_root, "delete", "pod", check=True)
