"""A detached container's output pump, from the side that starts and ends it.

``kabuto create`` leaves the pump (kabuto.runtime.iopump) behind as runc leaves its container
process: spawned in a session of its own, ready once it holds its agent connection, ended by
``delete`` (bounded, SIGTERM then SIGKILL; a reused pid is left alone).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from typing import Any

import psutil

from kabuto.processes import live_process, process_record
from kabuto.runtime.sandbox import SandboxError

# A detached container's output pump reaches the agent within this, or `create` fails.
PUMP_READY_TIMEOUT = 60.0


# Once ended by `delete`, the pump has this long to go before SIGKILL.
PUMP_EXIT_TIMEOUT = 5.0


def spawn_pump(container_id: str, addresses: list[str]) -> dict[str, Any]:
    """Start the pump and wait (bounded) until it holds its agent connection."""
    ready_read, ready_write = os.pipe()
    try:
        command = [sys.executable, "-m", "kabuto.runtime.iopump", "--ready-fd", str(ready_write),
                   "--container", container_id, *(f"--agent={address}" for address in addresses)]
        # its own session: a Ctrl-C meant for the caller's shell does not end the container's output
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(ready_write,),
                                   start_new_session=True, close_fds=True)
    finally:
        os.close(ready_write)
    try:
        readable, _, _ = select.select([ready_read], [], [], PUMP_READY_TIMEOUT)
        ready = bool(readable) and os.read(ready_read, 1) == b"1"
    finally:
        os.close(ready_read)
    pump = process_record(process.pid)
    if not ready:
        end_pump(pump, grace=0.0)
        process.wait()
        raise SandboxError(f"container {container_id!r}: its output pump could not reach the agent "
                           f"within {PUMP_READY_TIMEOUT:g}s")
    # never waited for: it outlives this process, as runc's container process outlives runc
    # (a returncode keeps Popen from warning that it still runs)
    process.returncode = 0
    return pump


def end_pump(pump: dict[str, Any], grace: float) -> None:
    """Let the pump finish within ``grace`` seconds (its container exited, its last output may
    still be on the way), then end it; a pid reused by another process is left alone."""
    process = live_process(pump)
    if process is None:
        return
    try:
        _, alive = psutil.wait_procs([process], timeout=grace)
        for method, timeout in ((psutil.Process.terminate, PUMP_EXIT_TIMEOUT),
                                (psutil.Process.kill, PUMP_EXIT_TIMEOUT)):
            if not alive:
                return
            for remaining in alive:
                with contextlib.suppress(psutil.Error):
                    method(remaining)
            _, alive = psutil.wait_procs(alive, timeout=timeout)
    except psutil.Error:
        return
