"""The host process standing for a detached container's process (kabuto.runtime.monitor), from
the side that starts and ends it.

``kabuto create`` and ``kabuto exec --detach`` leave the monitor behind as runc leaves its
container process: a child of theirs (so their caller's subreaper reaps it), with their stdio,
ready once it holds its agent connection. It ends by itself when the process exits or the VM
goes; ``delete`` waits for it (bounded) and then kills it (a reused pid is left alone).
SIGTERM would only be forwarded to the container, so the end is SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
from typing import Any

import psutil

from kabuto.processes import live_process, process_record
from kabuto.runtime.sandbox import SandboxError

# A monitor reaches the agent within this, or `create` fails.
MONITOR_READY_TIMEOUT = 60.0
# the most a failing monitor may say about why
MAX_REASON = 4096
# Once its container is gone, a monitor has this long to exit before SIGKILL.
MONITOR_EXIT_TIMEOUT = 5.0
EXIT_POLL = 0.05


def spawn_monitor(container_id: str, addresses: list[str], *, exec_id: str = "",
                  console_fd: int | None = None) -> dict[str, Any]:
    """Start the monitor with this process's stdio and wait (bounded) until it holds its agent
    connection; its {"pid", "create_time"}."""
    ready_read, ready_write = os.pipe()
    passed = [ready_write, *([] if console_fd is None else [console_fd])]
    try:
        command = [sys.executable, "-m", "kabuto.runtime.monitor", "--ready-fd", str(ready_write),
                   "--container", container_id, *(f"--agent={address}" for address in addresses)]
        if exec_id:
            command += ["--exec-id", exec_id]
        if console_fd is not None:
            command += ["--console-fd", str(console_fd)]
        # its own session: a Ctrl-C meant for the caller's shell does not end the container's
        # process, and a pty can become its controlling terminal
        process = subprocess.Popen(command, pass_fds=passed, start_new_session=True, close_fds=True)
    finally:
        os.close(ready_write)
    try:
        readable, _, _ = select.select([ready_read], [], [], MONITOR_READY_TIMEOUT)
        answer = os.read(ready_read, MAX_REASON) if readable else b""
    finally:
        os.close(ready_read)
    if answer != b"1":
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        reason = answer[1:].decode(errors="replace") or f"no answer within {MONITOR_READY_TIMEOUT:g}s"
        raise SandboxError(f"container {container_id!r}: its host process could not start: {reason}")
    monitor = process_record(process.pid)
    # never waited for here: it outlives this process, as runc's container process outlives runc
    # (a returncode keeps Popen from warning that it still runs)
    process.returncode = 0
    return monitor


def end_monitor(monitor: dict[str, Any], grace: float) -> None:
    """Let the monitor exit by itself within ``grace`` seconds (its process ended, its last
    output may still be on the way), then kill it; a pid reused by another process is left
    alone. A zombie (its parent has not reaped it yet) counts as gone."""
    deadline = time.monotonic() + grace
    while (process := live_process(monitor)) is not None:
        if time.monotonic() >= deadline:
            with contextlib.suppress(psutil.Error):
                process.kill()
            deadline = time.monotonic() + MONITOR_EXIT_TIMEOUT
            while live_process(monitor) is not None and time.monotonic() < deadline:
                time.sleep(EXIT_POLL)
            return
        time.sleep(EXIT_POLL)
