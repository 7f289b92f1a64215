"""`kabuto vm boot` as a user runs it: a real boot, Ctrl-C in the middle, a bad configuration."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kabuto.cli.vm_cmd import BOOT_STEPS

pytestmark = pytest.mark.vm

KABUTO = [sys.executable, "-c", "from kabuto.cli.main import main; main()"]
RUN_TIMEOUT = 240


def kabuto(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KABUTO, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          check=False, **kwargs)  # type: ignore[call-overload]


def test_vm_boot_reports_guest_and_phases(vm_root: Path) -> None:
    """The phases on the host's and the guest's clocks; and, as stderr is no terminal here (a log,
    CI), a line per boot step as it begins, in order, where a terminal shows a bar."""
    result = kabuto("vm", "boot", "--hypervisor", "qemu", "--jailer-root", str(vm_root), "--format", "json",
                    "--timeout", "180")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hypervisor"] == "qemu"
    assert report["guest"]["kernel_release"]
    assert report["guest"]["online_cpus"] >= 1
    assert report["guest"]["is_init"] is True
    phases = report["phases"]
    assert set(phases) == {"vmm_spawn", "guest_port_open", "vm_started", "kernel_to_init", "kernel_to_agent",
                           "kernel_to_serving", "agent_ready"}
    assert 0 < phases["vmm_spawn"] <= phases["guest_port_open"] <= phases["vm_started"]
    assert phases["vm_started"] <= phases["agent_ready"]
    assert 0 < phases["kernel_to_init"] < phases["kernel_to_agent"] <= phases["kernel_to_serving"]
    assert phases["kernel_to_serving"] < phases["agent_ready"]
    lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if line.startswith("[")]
    assert lines == list(BOOT_STEPS), result.stderr
    # vm_root's teardown asserts the VM left nothing behind


def _sigint_as_at_a_terminal() -> None:
    # Ctrl-C reaches a terminal's foreground job with SIGINT at its default; a job a script put in
    # the background (one way to start CI) inherits it ignored, and Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_boot_stops_and_cleans(vm_root: Path, leftover_check: Callable[[Path], None]) -> None:
    process = subprocess.Popen([*KABUTO, "vm", "boot", "--jailer-root", str(vm_root)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_sigint_as_at_a_terminal)
    try:
        deadline = time.monotonic() + 60
        # interrupt once QEMU is up and the guest is booting
        while not list(vm_root.glob("*/qmp.sock")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        assert list(vm_root.glob("*/qmp.sock")), "QEMU never started"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    leftover_check(vm_root)


def test_missing_binary_is_a_clear_error(tmp_path: Path, vm_root: Path) -> None:
    config = tmp_path / "configuration.toml"
    config.write_text(textwrap.dedent("""
        [runtime]
        hypervisor_name = "qemu"
        [hypervisor.qemu]
        path = "/usr/bin/qemu-system-nonexistent"
    """))
    result = kabuto("vm", "boot", "--config", str(config), "--jailer-root", str(vm_root))
    assert result.returncode == 1
    assert "path = '/usr/bin/qemu-system-nonexistent': does not exist" in result.stderr
    assert "Traceback" not in result.stderr
