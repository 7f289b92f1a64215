"""A detached container (`kabuto create` + `kabuto start`): its output goes where create's stdout
and stderr pointed, as under runc, however much it writes; `delete` leaves nothing behind.

One VM boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_runtime_helpers import (
    CLI_TIMEOUT,
    KABUTO,
    assert_nothing_left,
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
    write_bundle,
)

pytestmark = pytest.mark.vm

LINE = b"0123456789abcde\n"
# well beyond the guest agent's bounded output buffer
OUTPUT_BYTES = 6 * 1024 * 1024 + 5
STOP_TIMEOUT = 300.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def pump_processes(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if "kabuto.runtime.monitor" in cmdline and any(str(root) in arg for arg in cmdline):
            found.append(process)
    return found


def test_detached_output_reaches_creates_stdout(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    script = f"yes 0123456789abcde | head -c {OUTPUT_BYTES}; echo stderr-end >&2"
    bundle = write_bundle(tmp_path / "bundle", rootfs, ["sh", "-c", script])
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    env = {**os.environ, "KABUTO_STATE_ROOT": str(state_root)}
    with out_path.open("wb") as out, err_path.open("wb") as err:
        created = subprocess.run([str(KABUTO), "create", "--bundle", str(bundle), "chatty"], env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=CLI_TIMEOUT)
    assert created.returncode == 0, err_path.read_bytes()
    # one pump, outliving `create`, holding the files create was given
    pumps = pump_processes(state_root)
    assert len(pumps) == 1 and os.getsid(pumps[0].pid) == pumps[0].pid

    kabuto(state_root, "start", "chatty", check=True)
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        status = json.loads(kabuto(state_root, "state", "chatty", check=True).stdout)["status"]
        if status == "stopped" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == "stopped"

    kabuto(state_root, "delete", "chatty", check=True)
    expected = (LINE * (OUTPUT_BYTES // len(LINE) + 1))[:OUTPUT_BYTES]
    output = out_path.read_bytes()
    assert len(output) == OUTPUT_BYTES and output == expected
    assert err_path.read_bytes() == b"stderr-end\n"
    assert not pump_processes(state_root)
    assert_nothing_left(state_root)
