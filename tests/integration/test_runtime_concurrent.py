"""Several CLI processes on one sandbox at once, against real QEMU: while `kabuto run` streams,
`kabuto exec` (several, one of them long), `state` and `kill` reach the same VM, as under runc.

QEMU's virtio-serial agent port takes one host connection at a time; each process claims a
port of its own, so none waits for the streaming one. One VM boot for the whole scenario.
"""

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
from test_runtime_helpers import (
    CLI_TIMEOUT,
    KABUTO,
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
    write_bundle,
)

pytestmark = pytest.mark.vm

READY_TIMEOUT = 300.0
EXIT_TIMEOUT = 60.0
# PID 1 of the container: says it is ready, then runs until SIGTERM, which it answers with 3
STREAMER = ["sh", "-c", "echo ready; trap 'echo got-term; exit 3' TERM; while :; do sleep 1; done"]


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def start_cli(root: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KABUTO_STATE_ROOT": str(root)}
    return subprocess.Popen([str(KABUTO), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def read_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The next stdout line of ``process``, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"no line from {process.args} within {timeout:g}s (got {line!r})")
            byte = os.read(process.stdout.fileno(), 1)
            if not byte:
                _, stderr = process.communicate(timeout=EXIT_TIMEOUT)
                raise AssertionError(f"{process.args} ended early ({process.returncode}): {stderr!r}")
            line += byte
    return line


def test_exec_state_and_kill_while_run_streams(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "marker").write_text("shared from the host\n")
    bundle = write_bundle(tmp_path / "bundle", rootfs, STREAMER)

    run = start_cli(state_root, "run", "--bundle", str(bundle), "streamer")
    try:
        assert read_line(run, READY_TIMEOUT) == b"ready\n"

        # a long exec streams too, on a port of its own
        slow = start_cli(state_root, "exec", "streamer", "sh", "-c",
                         "echo slow-started; sleep 3; echo slow-done")
        assert read_line(slow, CLI_TIMEOUT) == b"slow-started\n"

        # meanwhile short calls come and go, two at once
        quick = [start_cli(state_root, "exec", "streamer", "cat", "/marker"),
                 start_cli(state_root, "exec", "streamer", "sh", "-c", "echo to-stderr >&2; exit 5")]
        outputs = [process.communicate(timeout=CLI_TIMEOUT) for process in quick]
        assert (quick[0].returncode, outputs[0]) == (0, (b"shared from the host\n", b""))
        assert (quick[1].returncode, outputs[1]) == (5, (b"", b"to-stderr\n"))

        state = json.loads(kabuto(state_root, "state", "streamer", check=True).stdout)
        assert state["status"] == "running" and state["id"] == "streamer" and state["pid"] > 0
        pids = json.loads(kabuto(state_root, "ps", "--format", "json", "streamer", check=True).stdout)
        assert len(pids) >= 2 and all(isinstance(pid, int) for pid in pids)  # init and the slow exec

        slow_out, slow_err = slow.communicate(timeout=CLI_TIMEOUT)
        assert (slow.returncode, slow_out, slow_err) == (0, b"slow-done\n", b"")

        kabuto(state_root, "kill", "streamer", "TERM", check=True)
        out, err = run.communicate(timeout=EXIT_TIMEOUT)
        assert (run.returncode, out, err) == (3, b"got-term\n", b"")
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.communicate(timeout=EXIT_TIMEOUT)
    assert kabuto(state_root, "state", "streamer").returncode == 1
