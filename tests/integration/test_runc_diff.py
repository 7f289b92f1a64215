"""Differential test: the same bundle under `runc run` and `kabuto run` gives the same stdout,
stderr and exit code.

Bundles are made like `runc spec` and edited; the rootfs is a busybox-static one built here.
To keep VM boots few, Kabuto's containers join one sandbox VM (CRI pod annotations, which
runc ignores); the missing-binary case runs standalone, so its VM is booted and must be
stopped with nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_runtime_helpers import (
    KABUTO,
    assert_nothing_left,
    busybox_rootfs,
    kabuto,
    new_state_root,
    remove_state_root,
    require_guest_image,
    write_bundle,
)

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = pytest.mark.vm

POD = "diffpod"
POD_ANNOTATIONS = {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: POD}
RUN_TIMEOUT = 300.0
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
SIGNAL_READY_TIMEOUT = 120.0


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    exit_code: int


@dataclass
class Case:
    name: str
    args: list[str]
    change: Callable[[dict[str, Any]], None] | None = None
    stdin: bytes | None = None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        target = spec
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        target[last] = value

    return change


LARGE = 3 * 1024 * 1024 + 17
CASES = [
    Case("args", ["echo", "hello", "wide world", "-n"]),
    Case("stdout-and-stderr", ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"]),
    Case("env", ["sh", "-c", "echo \"$GREETING\"; env | sort"],
         _set("process.env", ["PATH=/bin", "GREETING=hello there", "EMPTY="])),
    Case("cwd", ["pwd"], _set("process.cwd", "/tmp")),
    Case("user-and-groups", ["id"],
         _set("process.user", {"uid": 1000, "gid": 1001, "additionalGids": [5, 7]})),
    Case("hostname", ["hostname"], _set("hostname", "diff-host")),
    Case("rlimits", ["sh", "-c", "ulimit -n; ulimit -Hn; ulimit -s"],
         _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 88},
                                  {"type": "RLIMIT_STACK", "soft": 4194304, "hard": 8388608}])),
    Case("readonly-root", ["sh", "-c", "touch /newfile; echo status $?; touch /tmp/x; echo tmp $?"]),
    Case("writable-root", ["sh", "-c", "touch /tmp/kabuto-diff && echo ok && rm /tmp/kabuto-diff"],
         _set("root.readonly", False)),
    Case("exit-code", ["sh", "-c", "exit 42"]),
    Case("child-killed-by-signal", ["sh", "-c", "sh -c 'kill -TERM $$'; echo child $?"]),
    Case("pid1-ignores-unhandled-signal", ["sh", "-c", "kill -TERM 1; echo still here"]),
    Case("stdin", ["sh", "-c", "wc -c; echo done"], stdin=b"x" * 100_000),
    Case("stdin-echo", ["cat"], stdin=bytes(range(256)) * 64),
    Case("large-output", ["sh", "-c", f"head -c {LARGE} /dev/zero | tr '\\0' 'k'; seq 1 20000 >&2"]),
]


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="kbd-rootfs-"))
    try:
        root = busybox_rootfs(directory / "rootfs")
        (root / "tmp").chmod(0o1777)
        yield root
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def runc_root() -> Iterator[Path]:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc)")
    root = Path(tempfile.mkdtemp(prefix="kbd-runc-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pod(rootfs: Path) -> Iterator[Path]:
    """A running Kabuto sandbox the diff cases join; its state root must end up empty."""
    require_guest_image()
    state_root = new_state_root()
    bundles = Path(tempfile.mkdtemp(prefix="kbd-pod-"))
    try:
        bundle = write_bundle(bundles / "pod", rootfs, SLEEPER)
        kabuto(state_root, "create", "-b", str(bundle), POD, check=True)
        kabuto(state_root, "start", POD, check=True)
        yield state_root
        kabuto(state_root, "delete", "--force", POD, check=True)
        assert_nothing_left(state_root)
    finally:
        remove_state_root(state_root)
        shutil.rmtree(bundles, ignore_errors=True)


def run_runc(runc_root: Path, bundle: Path, container_id: str, stdin: bytes | None) -> Outcome:
    result = subprocess.run(["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), container_id],
                            input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                            capture_output=True, timeout=RUN_TIMEOUT)
    subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container_id], capture_output=True)
    return Outcome(result.stdout, result.stderr, result.returncode)


def run_kabuto(state_root: Path, bundle: Path, container_id: str, stdin: bytes | None) -> Outcome:
    result = kabuto(state_root, "run", "--bundle", str(bundle), container_id, input=stdin,
                    timeout=RUN_TIMEOUT)
    return Outcome(result.stdout, result.stderr, result.returncode)


def make_bundles(tmp_path: Path, rootfs: Path, args: list[str], change: Any) -> tuple[Path, Path]:
    runc_bundle = write_bundle(tmp_path / "runc", rootfs, args, change=change)
    kabuto_bundle = write_bundle(tmp_path / "kabuto", rootfs, args, change=change,
                                 annotations=POD_ANNOTATIONS)
    return runc_bundle, kabuto_bundle


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_same_as_runc(case: Case, rootfs: Path, runc_root: Path, pod: Path, tmp_path: Path) -> None:
    runc_bundle, kabuto_bundle = make_bundles(tmp_path, rootfs, case.args, case.change)
    container_id = f"diff-{case.name}"
    expected = run_runc(runc_root, runc_bundle, container_id, case.stdin)
    got = run_kabuto(pod, kabuto_bundle, container_id, case.stdin)
    assert got.exit_code == expected.exit_code, (got, expected)
    assert got.stderr == expected.stderr
    assert got.stdout == expected.stdout
    # the joined container is gone again; only the pod remains
    assert f"{container_id}" not in kabuto(pod, "list", "-q", check=True).stdout.decode().split()


def _interrupted_runs(runc_root: Path, pod: Path, bundles: tuple[Path, Path], container_id: str,
                      interrupt: Callable[[subprocess.Popen[bytes], list[str]], None]) -> list[Outcome]:
    """Start the same bundle under runc and Kabuto; once it printed its first line, call
    ``interrupt(process, runtime_command)``; collect what each run gave."""
    outcomes = []
    runtimes = (["runc", "--root", str(runc_root)], [str(KABUTO)])
    for runtime, bundle in zip(runtimes, bundles, strict=True):
        process = subprocess.Popen([*runtime, "run", "--bundle", str(bundle), container_id],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "KABUTO_STATE_ROOT": str(pod)})
        try:
            first = _readline_within(process, SIGNAL_READY_TIMEOUT)
            interrupt(process, runtime)
            rest, stderr = process.communicate(timeout=RUN_TIMEOUT)
            outcomes.append(Outcome(first + rest, stderr, process.returncode))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container_id], capture_output=True)
    return outcomes


def test_forwarded_sigterm(rootfs: Path, runc_root: Path, pod: Path, tmp_path: Path) -> None:
    """SIGTERM to the runtime process reaches the container's handler (as Ctrl-C would)."""
    args = ["sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.2; done"]
    bundles = make_bundles(tmp_path, rootfs, args, None)
    expected, got = _interrupted_runs(runc_root, pod, bundles, "diff-term",
                                      lambda process, runtime: process.send_signal(signal.SIGTERM))
    assert expected == Outcome(b"ready\ngot TERM\n", b"", 3)
    assert got == expected


def test_kill_during_run(rootfs: Path, runc_root: Path, pod: Path, tmp_path: Path) -> None:
    """`kill ID TERM` is ignored by a PID 1 without handler; `kill ID KILL` ends the run with 137."""
    args = ["sh", "-c", "echo ready; while :; do sleep 0.2; done"]
    bundles = make_bundles(tmp_path, rootfs, args, None)

    def kill_twice(process: subprocess.Popen[bytes], runtime: list[str]) -> None:
        env = {**os.environ, "KABUTO_STATE_ROOT": str(pod)}
        for name in ("TERM", "KILL"):
            subprocess.run([*runtime, "kill", "diff-kill", name], env=env, check=True, capture_output=True,
                           timeout=RUN_TIMEOUT)

    expected, got = _interrupted_runs(runc_root, pod, bundles, "diff-kill", kill_twice)
    assert expected == Outcome(b"ready\n", b"", 128 + signal.SIGKILL)
    assert got == expected


def _readline_within(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    import selectors

    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"{process.args[0]}: no output within {timeout:g}s")
    return process.stdout.readline()


def test_exec_killed_by_signal_exit_code(rootfs: Path, runc_root: Path, pod: Path) -> None:
    """An exec'd process killed by signal N: both runtimes exit 128+N."""
    runc_id = "diff-exec"
    bundle = write_bundle(Path(tempfile.mkdtemp(prefix="kbd-exec-")), rootfs,
                          ["sh", "-c", "while :; do sleep 1; done"])
    try:
        subprocess.run(["runc", "--root", str(runc_root), "run", "-d", "--bundle", str(bundle), runc_id],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True, timeout=RUN_TIMEOUT)
        for script, status in (("kill -KILL $$", 137), ("kill -SEGV $$", 139), ("exit 5", 5)):
            expected = subprocess.run(["runc", "--root", str(runc_root), "exec", runc_id, "sh", "-c", script],
                                      stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
            got = kabuto(pod, "exec", POD, "sh", "-c", script)
            assert expected.returncode == status
            assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout,
                                                                 expected.stderr)
    finally:
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", runc_id], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def test_missing_binary_standalone(rootfs: Path, runc_root: Path, tmp_path: Path) -> None:
    """Both fail with a message naming the binary; Kabuto's own VM is stopped, nothing is left."""
    require_guest_image()
    bundle = write_bundle(tmp_path / "bundle", rootfs, ["no-such-binary", "arg"])
    expected = run_runc(runc_root, bundle, "diff-missing", None)
    state_root = new_state_root()
    try:
        got = run_kabuto(state_root, bundle, "diff-missing", None)
        assert_nothing_left(state_root)
    finally:
        remove_state_root(state_root)
    assert expected.exit_code != 0 and got.exit_code != 0
    assert b"no-such-binary" in expected.stderr and b"no-such-binary" in got.stderr
    assert got.stdout == expected.stdout == b""
