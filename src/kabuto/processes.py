"""A process named across kabuto processes: its pid and its start time.

A pid alone may have been reused by the time another process reads it from a record; the
start time tells. One liveness rule for everything kabuto records (a VMM, virtiofsd, the shim
that owns a sandbox, a detached container's output pump).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psutil

#: two readings of one process's start time agree to this (psutil derives it from boot time
#: and clock ticks, so the same process reads the same value)
START_TIME_TOLERANCE = 0.01


def process_record(pid: int) -> dict[str, Any]:
    """``{"pid", "create_time"}`` of a running process, for a record another process reads."""
    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def live_process(record: Mapping[str, Any]) -> psutil.Process | None:
    """The process ``record`` names if it still runs: not exited, not a zombie, not a reused pid."""
    try:
        process = psutil.Process(int(record["pid"]))
        if abs(process.create_time() - float(record["create_time"])) > START_TIME_TOLERANCE:
            return None
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None
    return process if still_running(process) else None


def still_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_running(pid: int | None) -> bool:
    """Whether ``pid`` names a process that has not exited (a zombie has)."""
    if pid is None:
        return False
    try:
        return still_running(psutil.Process(pid))
    except psutil.Error:
        return False
