"""Faults under containerd (Debian's containerd, driven with ctr, as
tests/integration/test_containerd_shim.py does): the VMM killed under a running task (containerd
gets the task's exit event within 5 s, the task is STOPPED, deleting it leaves nothing) and the
shim itself killed (containerd runs `shim delete` and drops the task; nothing is left)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_helpers import CONTAINERD, CTR, Containerd, remove_tree, short_temp_dir
from reliability_support import Figures, scale
from test_runtime_helpers import busybox_rootfs, require_guest_image

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not (CONTAINERD.is_file() and CTR.is_file()),
                       reason="containerd is not installed (apt-get install containerd)"),
]

RUNTIME = "io.containerd.kabuto.v2"
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
DETECTION_LIMIT = 5.0


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    require_guest_image()
    directory, state_root = short_temp_dir("kbc-"), short_temp_dir("kbt-")
    daemon = Containerd(directory, state_root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        daemon.force_clean()
        remove_tree(directory)
        remove_tree(state_root)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return busybox_rootfs(tmp_path / "rootfs")


def run_detached(containerd: Containerd, rootfs: Path, task_id: str) -> None:
    containerd.check("run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), "--detach",
                     "--rootfs", str(rootfs), task_id, *SLEEPER)
    assert containerd.task_status() == {task_id: "RUNNING"}


def exit_event(events: subprocess.Popen[bytes], task_id: str, timeout: float) -> dict[str, object] | None:
    """The next /tasks/exit event `ctr events` prints for ``task_id``, within ``timeout``."""
    assert events.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as selector:
        selector.register(events.stdout, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                break
            chunk = os.read(events.stdout.fileno(), 65536)
            if not chunk:
                break
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if b"/tasks/exit" in line and task_id.encode() in line:
                    start = line.find(b"{")
                    return json.loads(line[start:]) if start >= 0 else {}
    return None


def test_vmm_killed_under_a_task_reaches_containerd_as_task_exit(containerd: Containerd, rootfs: Path,
                                                                 figures: Figures) -> None:
    run_detached(containerd, rootfs, "vmmdies")
    events = subprocess.Popen(containerd.ctr_command("events"), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # `ctr events` subscribed
        (vmm,) = containerd.vmms()
        killed = time.monotonic()
        vmm.send_signal(signal.SIGKILL)
        event = exit_event(events, "vmmdies", 60)
        detected = time.monotonic() - killed
    finally:
        events.kill()
        events.wait(30)
    figures["task_exit_after_seconds"] = round(detected, 2)
    assert event is not None, containerd.log_tail()
    assert detected < DETECTION_LIMIT, f"TaskExit after {detected:.1f}s"
    assert containerd.wait_for_status("vmmdies", "STOPPED", 30) == "STOPPED"
    containerd.check("task", "delete", "vmmdies")
    containerd.check("container", "delete", "vmmdies")
    left = containerd.wait_until_clean()
    assert not left, left


def test_shim_killed_then_shim_delete_leaves_nothing(containerd: Containerd, rootfs: Path,
                                                     figures: Figures) -> None:
    run_detached(containerd, rootfs, "shimdies")
    (shim,) = containerd.shims()
    killed = time.monotonic()
    shim.send_signal(signal.SIGKILL)
    # containerd notices the lost shim, runs `containerd-shim-kabuto-v2 ... delete`, publishes the
    # task's exit and removes the task
    deadline = time.monotonic() + 60
    while "shimdies" in containerd.task_status() and time.monotonic() < deadline:
        time.sleep(0.2)
    figures["task_gone_after_seconds"] = round(time.monotonic() - killed, 2)
    assert "shimdies" not in containerd.task_status(), containerd.log_tail()
    containerd.check("container", "delete", "shimdies")
    left = containerd.wait_until_clean()
    figures["left_after_cleanup"] = len(left)
    assert not left, left


def shim_counts(containerd: Containerd) -> dict[str, int]:
    """What the pod's long-lived shim holds, and what is below the state root."""
    (shim,) = containerd.shims()
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo]
    return {
        "shim open fds": shim.num_fds(),
        "shim threads": shim.num_threads(),
        "shim children": len(shim.children(recursive=True)),
        "processes naming the state root": len(containerd.sandbox_processes()),
        "mounts below the state root": sum(m.startswith(f"{containerd.state_root}/") for m in mounts),
        "paths below the state root": sum(1 for _ in containerd.state_root.rglob("*")),
    }


def test_pod_container_cycles_leave_the_shim_as_it_was(containerd: Containerd, rootfs: Path,
                                                       figures: Figures) -> None:
    """N containers join a running pod and go (`ctr run --rm`, each a CreateContainer in the pod's
    VM): the pod's shim holds as many fds, threads and children after as before, and nothing
    else is left below the state root."""
    cycles = scale(8, 300)

    def member(kind: str, *flags: str) -> list[str]:
        return ["run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), *flags,
                "--annotation", f"{CONTAINER_TYPE_ANNOTATION}={kind}",
                "--annotation", f"{SANDBOX_ID_ANNOTATION}=lpod", "--rootfs", str(rootfs)]

    def cycle(number: int) -> None:
        result = containerd.ctr(*member("container", "--rm"), f"app{number}", "/bin/echo", f"hi-{number}")
        assert (result.returncode, result.stdout) == (0, f"hi-{number}\n".encode()), \
            containerd.explain(result)

    containerd.check(*member("sandbox", "--detach"), "lpod", *SLEEPER)
    try:
        cycle(-1)  # the first member makes what later ones share
        before = shim_counts(containerd)
        started = time.monotonic()
        for number in range(cycles):
            cycle(number)
        figures["seconds_per_cycle"] = round((time.monotonic() - started) / cycles, 2)
        after = shim_counts(containerd)
        figures["cycles"] = cycles
        figures["counted"] = before
        figures["leaked"] = {name: after[name] - before[name] for name in before
                             if after[name] != before[name]}
        assert after == before, (before, after)
    finally:
        containerd.ctr("task", "kill", "lpod")
        containerd.wait_for_status("lpod", "STOPPED", 60)
        containerd.ctr("task", "delete", "lpod")
        containerd.ctr("container", "delete", "lpod")
    left = containerd.wait_until_clean()
    assert not left, left
