"""QEMU's migration stream as the VM snapshot: save a paused VM to a file, load one at boot."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.qemu.qmp import POLL_INTERVAL, QmpSession

MIGRATION_TIMEOUT = 120.0


async def save_to(qmp: QmpSession, target: Path) -> None:
    """Migrate the (paused) VM's RAM and device state into ``target``."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        await qmp.pass_fd(fd, "migration-out")
        await qmp.call("migrate", {"uri": "fd:migration-out"})
    finally:
        os.close(fd)
    await _wait(qmp, "query-migrate", done=lambda r: r.get("status") == "completed",
                failed=lambda r: r.get("status") in ("failed", "cancelled"))


async def load_from(qmp: QmpSession, source: Path,
                    unless_exit: Callable[[Awaitable[Any], str], Awaitable[Any]]) -> None:
    """Feed ``source`` to a QEMU started with ``-incoming defer``; ``unless_exit`` ends the wait
    when QEMU dies."""
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await qmp.pass_fd(fd, "migration-in")
        await qmp.call("migrate-incoming", {"uri": "fd:migration-in"})
    finally:
        os.close(fd)
    await unless_exit(
        _wait(qmp, "query-status", done=lambda r: r.get("status") != "inmigrate", failed=lambda r: False),
        f"while loading the saved state {source}",
    )


async def _wait(qmp: QmpSession, query: str, done: Callable[[Any], bool],
                failed: Callable[[Any], bool]) -> None:
    try:
        async with asyncio.timeout(MIGRATION_TIMEOUT):
            while True:
                reply = await qmp.call(query)
                if failed(reply):
                    raise HypervisorError(f"qemu: migration failed: {reply.get('error-desc', reply)}")
                if done(reply):
                    return
                await asyncio.sleep(POLL_INTERVAL * 5)
    except TimeoutError:
        raise VmTimeout(f"qemu: migration of VM {qmp.vm_id} did not finish within {MIGRATION_TIMEOUT:g}s") \
            from None
