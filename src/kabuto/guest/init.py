"""What the agent does as PID 1: reap children, report fatal errors, power off.

A PID 1 that exits makes the kernel panic, often with nothing useful on the console, so
every way out of the agent ends in ``power_off`` after writing the reason to the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)

CONSOLE = "/dev/console"
# reboot(2) commands.
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
POWEROFF_COMMAND_TIMEOUT = 5.0


class Reaper:
    """Reaps every exited child (orphans are re-parented to PID 1) on SIGCHLD.

    Code that spawns a process calls ``watch(pid)`` right after spawning, before it next
    yields to the event loop, and awaits the future for the exit code (negative: killed
    by that signal), as os.waitstatus_to_exitcode gives it. asyncio's own child watching
    must not be used alongside: this reaper collects every child.
    """

    def __init__(self) -> None:
        self._watchers: dict[int, asyncio.Future[int]] = {}

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def watch(self, pid: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._watchers[pid] = future
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            future = self._watchers.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(os.waitstatus_to_exitcode(status))


def is_init() -> bool:
    return os.getpid() == 1


def console_message(text: str) -> None:
    """Write to the kernel console, which is what the host sees when all else fails."""
    with contextlib.suppress(OSError), open(CONSOLE, "w") as console:
        console.write(f"kabuto-agent: {text}\n")


def power_off() -> None:
    """Power the VM off now; falls back to a reboot (QEMU's -no-reboot turns it into an exit)."""
    with contextlib.suppress(OSError):
        os.sync()
    try:
        # Imported here: a minimal guest Python may lack ctypes, and the agent must still start.
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        for command in (RB_POWER_OFF, RB_AUTOBOOT):
            libc.reboot(command)
            log.error("reboot(%#x) failed: %s", command, os.strerror(ctypes.get_errno()))
    except (ImportError, OSError) as exc:
        log.error("cannot call reboot(2) through libc: %s", exc)
    # Without ctypes/libc, busybox can still do it.
    for command in (["poweroff", "-f"], ["busybox", "poweroff", "-f"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(command, timeout=POWEROFF_COMMAND_TIMEOUT, check=False)


def fatal(reason: str) -> None:
    """Report a fatal error where the host can see it; as PID 1, power off."""
    log.critical("%s", reason)
    if is_init():
        console_message(f"fatal: {reason}; powering off")
        power_off()
