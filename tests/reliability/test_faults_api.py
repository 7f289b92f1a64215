"""Faults under the Python API (kabuto.AsyncSandbox / kabuto.Sandbox) against the shipped image:
a process with endless output (the host keeps at most its capture bound, the process is ended, the
sandbox stays usable), the VMM killed under a running process (its wait ends within 5 s with the
reason), and a program killed mid-boot (the next sandbox in that state root cleans what it left).
Nothing stray reaches the terminal: stderr is asserted empty and no log record of WARNING or above
is made (a program without logging set up would see those on stderr, through logging's last resort)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from reliability_support import Figures
from test_runtime_helpers import assert_nothing_left, require_guest_image

import kabuto
from kabuto import api
from kabuto.errors import KabutoError

pytestmark = pytest.mark.vm

DETECTION_LIMIT = 5.0
# small enough that TCG's virtio-serial moves it in seconds
CAPTURE_BOUND = 1 << 20


async def test_endless_output_then_vmm_killed(state_root: Path, monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture, figures: Figures) -> None:
    require_guest_image()
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(api, "MAX_CAPTURE_BYTES", CAPTURE_BOUND)
    async with kabuto.AsyncSandbox(state_root=state_root) as sb:
        rss_before = psutil.Process().memory_info().rss
        started = time.monotonic()
        with pytest.raises(KabutoError, match=f"stdout of 'yes' exceeds {CAPTURE_BOUND} bytes"):
            await asyncio.wait_for(sb.run(["yes"]), 120)
        figures["endless_output_ended_after_seconds"] = round(time.monotonic() - started, 2)
        figures["rss_growth_mib"] = round((psutil.Process().memory_info().rss - rss_before) / 2**20, 1)
        # the process was ended, the sandbox still serves
        assert (await sb.run(["sh", "-c", "pidof yes || echo none"])).stdout == b"none\n"
        spawned = await sb.spawn(["sh", "-c", "echo up; while :; do sleep 1; done"])
        pids = await sb.sandbox.hypervisor.get_pids()
        killed = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(KabutoError, match=r"its VM exited \(.*killed by signal 9.*\)") as failure:
            await asyncio.wait_for(spawned.wait(), 60)
        detected = time.monotonic() - killed
        figures["vmm_kill_detection_seconds"] = round(detected, 2)
        assert detected < DETECTION_LIMIT, f"noticed after {detected:.1f}s: {failure.value}"
    assert_nothing_left(state_root)
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "a stray line reached the terminal"
    assert not caplog.records, [r.getMessage() for r in caplog.records]


KILLED_PROGRAM = """
import sys, kabuto
with kabuto.Sandbox(state_root=sys.argv[1]) as sb:
    sb.run(["true"])
"""


def test_program_killed_mid_boot_is_cleaned_by_the_next_sandbox(
        state_root: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    require_guest_image()
    program = subprocess.Popen([sys.executable, "-c", KILLED_PROGRAM, str(state_root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any("qemu" in (p.info["name"] or "")
                      and str(state_root) in " ".join(p.info["cmdline"] or [])
                      for p in psutil.process_iter(["name", "cmdline"])):
            assert program.poll() is None, program.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        program.kill()
        assert program.wait(30) == -signal.SIGKILL
    finally:
        if program.poll() is None:
            program.kill()
        program.communicate()
    (left,) = [p.name for p in state_root.iterdir() if p.name.startswith("py-")]
    with caplog.at_level(logging.WARNING), kabuto.Sandbox(state_root=state_root) as sb:
        assert sb.run(["echo", "ok"]).stdout == b"ok\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"sandbox {left!r} was left half created by pid "
                                                         f"{program.pid}, which died"), warnings
    assert_nothing_left(state_root)
    assert capfd.readouterr().err == ""
