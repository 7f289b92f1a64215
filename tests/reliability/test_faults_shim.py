"""Faults under containerd (Debian's containerd, driven with ctr, as
tests/integration/test_containerd_shim.py does): the VMM killed under a running task (containerd
gets the task's exit event within 5 s, the task is STOPPED, deleting it leaves nothing), the
shim itself killed (containerd runs `shim delete` and drops the task; nothing is left),
containerd restarting while a task's VM boots, four pods at once, and pod members joining and
leaving one pod with the shim's and the VMM's resources counted."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from containerd_helpers import CONTAINERD, CTR, Containerd, remove_tree, short_temp_dir
from reliability_support import Figures, scale, soak_cycles
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
# pod members joining and leaving one running pod (~1.3 s each on an idle machine)
CONTAINER_CYCLES = 30
PARALLEL_PODS = 4


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
        # the pod's VMM and virtiofsd: an fd kept per container (a hot-plug, a share) shows here
        "open fds of the VMM and virtiofsd": sum(p.num_fds() for p in containerd.sandbox_processes()),
        "mounts below the state root": sum(m.startswith(f"{containerd.state_root}/") for m in mounts),
        "paths below the state root": sum(1 for _ in containerd.state_root.rglob("*")),
    }


@pytest.mark.timeout(1800)  # 30 members at 10-20 s each on a loaded machine
def test_pod_container_cycles_leave_the_shim_as_it_was(containerd: Containerd, rootfs: Path,
                                                       figures: Figures) -> None:
    """N containers join a running pod and go (`ctr run --rm`, each a CreateContainer in the pod's
    VM): the pod's shim holds as many fds, threads and children after as before, and nothing
    else is left below the state root."""
    cycles = scale(CONTAINER_CYCLES, soak_cycles(CONTAINER_CYCLES))

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


def test_containerd_restarting_during_a_create(containerd: Containerd, rootfs: Path,
                                               figures: Figures) -> None:
    """containerd stops (SIGTERM) while the shim boots the task's VM and starts again: the
    interrupted `ctr run` fails, containerd finds the task (or finds it gone) through the shim
    it reloads, deleting it leaves nothing, and the next task runs.

    Stopping, containerd cancels its Create call and cleans up after it (Delete, then Shutdown)
    while it exits: the shim may get both, only the Delete, or neither (its connection just
    closes). Each way the create is undone and the shim, holding nothing, goes."""
    command = containerd.ctr_command("run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir),
                                     "--detach", "--rootfs", str(rootfs), "midcreate", *SLEEPER)
    interrupted = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not containerd.vmms() and time.monotonic() < deadline and interrupted.poll() is None:
            time.sleep(0.05)
        assert containerd.vmms(), ("no VMM while the task was created", interrupted.poll(),
                                   containerd.log_tail())
        containerd.restart()
        restarted = time.monotonic()
        _, err = interrupted.communicate(timeout=120)
    finally:
        if interrupted.poll() is None:
            interrupted.kill()
            interrupted.wait(30)
    figures["interrupted_ctr_exit_code"] = interrupted.returncode
    assert interrupted.returncode != 0, err
    # a create the shim finished before containerd's connection went shows as CREATED once
    # containerd has reloaded the shim; an undone one's shim goes, and containerd cleans up after it
    deadline = time.monotonic() + 60
    seen = containerd.task_status().get("midcreate", "")
    while seen != "CREATED" and containerd.shims() and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = containerd.task_status().get("midcreate", "")
    figures["task_status_after_restart"] = seen or "(gone)"
    figures["status_seen_after_seconds"] = round(time.monotonic() - restarted, 2)
    assert seen in ("CREATED", ""), (seen, containerd.log_tail())
    if seen:
        containerd.check("task", "delete", "--force", "midcreate")
    containerd.check("container", "delete", "midcreate")
    left = containerd.wait_until_clean()
    figures["left_after_delete"] = len(left)
    if left:
        for shim in containerd.shims():
            with contextlib.suppress(psutil.Error):
                shim.kill()
        remove_tree(containerd.state_root / ".shim")
    assert not left, left
    after = containerd.ctr("run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), "--rm",
                           "--rootfs", str(rootfs), "after", "/bin/echo", "after")
    assert (after.returncode, after.stdout) == (0, b"after\n"), containerd.explain(after)
    assert not containerd.wait_until_clean()


def test_four_pods_at_once(containerd: Containerd, rootfs: Path, figures: Figures) -> None:
    """Four pods started at once (CRI's annotations: a sandbox container each, so a shim and a VM
    each), a member joining each, all answering; then all stopped and deleted: nothing left."""
    pods = [f"pod{i}" for i in range(PARALLEL_PODS)]

    def args(pod: str, kind: str, *flags: str) -> list[str]:
        return ["run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), *flags,
                "--annotation", f"{CONTAINER_TYPE_ANNOTATION}={kind}",
                "--annotation", f"{SANDBOX_ID_ANNOTATION}={pod}", "--rootfs", str(rootfs)]

    def one_pod(pod: str) -> tuple[int, bytes, int, bytes]:
        made = containerd.ctr(*args(pod, "sandbox", "--detach"), pod, *SLEEPER)
        member = containerd.ctr(*args(pod, "container", "--rm"), f"{pod}-app", "/bin/echo", f"in {pod}")
        return made.returncode, made.stderr, member.returncode, member.stdout

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(PARALLEL_PODS) as pool:
            results = dict(zip(pods, pool.map(one_pod, pods), strict=True))
        figures["pods"] = PARALLEL_PODS
        figures["seconds_for_all"] = round(time.monotonic() - started, 1)
        assert {pod: (made, member, out) for pod, (made, _, member, out) in results.items()} == \
            {pod: (0, 0, f"in {pod}\n".encode()) for pod in pods}, (results, containerd.log_tail())
        assert containerd.task_status() == dict.fromkeys(pods, "RUNNING")
        assert len(containerd.shims()) == PARALLEL_PODS and len(containerd.vmms()) == PARALLEL_PODS
    finally:
        for pod in pods:
            containerd.ctr("task", "kill", pod)
        for pod in pods:
            containerd.wait_for_status(pod, "STOPPED", 60)
            containerd.ctr("task", "delete", pod)
            containerd.ctr("container", "delete", pod)
    left = containerd.wait_until_clean()
    assert not left, left
