"""The factory cache's rows of `make bench`: `kabuto run /bin/true` from a cached VM against a
cold one and against bare QEMU's floor, and starts per minute with the cache against without.

The daemon (`kabuto factory serve`) runs as its own process, as in production; a cached start
is timed once the daemon has a VM ready (the wait for it is not counted), a cold one with the
same configuration but vm_cache_number = 0. Starts per minute: back-to-back `kabuto run`
calls, the daemon refilling meanwhile (2 VMs cached) on the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kabuto.bench.floor import boot_floor, one_line_initrd
from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import resolve_config
from kabuto.runtime.factory import cache_protocol as wire

READY_TIMEOUT = 300.0
STOP_TIMEOUT = 60.0
#: VMs the daemon keeps for the starts-per-minute row
CACHED = 2

Row = Callable[..., dict[str, object]]
Alternate = Callable[[int, Callable[[], Awaitable[float]], Callable[[], Awaitable[float]]],
                     Awaitable[tuple[list[float], list[float]]]]


def _config(path: Path, number: int, endpoint: Path) -> Path:
    path.write_text(builtin_default_text() + f'\n[factory]\nvm_cache_number = {number}\n'
                    f'vm_cache_endpoint = "{endpoint}"\n')
    return path


async def _status(endpoint: Path) -> dict[str, Any] | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(endpoint)),
                                                wire.LINE_TIMEOUT)
    except (OSError, TimeoutError):
        return None
    try:
        await wire.send(writer, {"op": "status"})
        return await wire.receive(reader)
    except wire.CacheProtocolError:
        return None
    finally:
        writer.close()


async def _wait_ready(endpoint: Path, daemon: subprocess.Popen[bytes], number: int = 1) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"kabuto factory serve exited {daemon.returncode}")
        status = await _status(endpoint)
        if status is not None and status["ready"] >= number:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the cache daemon had no {number} VM(s) ready within {READY_TIMEOUT:g}s")


def _timed(args: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=300, env=env)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        why = done.stderr.decode(errors='replace')
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {why}")
    return elapsed


def _serve(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)


async def cache_rows(runs: int, work: Path, row: Row, alternate: Alternate) -> list[dict[str, object]]:
    from kabuto.runtime.busybox import make_busybox_rootfs

    directory = work / "cache"
    directory.mkdir()
    endpoint = directory / "cache.sock"
    cached_config = _config(directory / "cached.toml", CACHED, endpoint)
    cold_config = _config(directory / "cold.toml", 0, endpoint)
    # both: a guest whose agent still imports its container service under a loaded host's TCG
    # answers CreateSandbox late, not never (the default 30 s bound failed cold starts here)
    (directory / "config.d").mkdir()
    (directory / "config.d" / "50-bench.toml").write_text("[agent.kata]\nrequest_timeout_ms = 120000\n")
    rootfs = make_busybox_rootfs(directory / "rootfs") if not (work / "rootfs").is_dir() else work / "rootfs"
    kabuto_bin = str(Path(sys.executable).with_name("kabuto"))
    env = {**os.environ, "KABUTO_STATE_ROOT": str(directory / "state")}
    table = resolve_config().table
    floor_initrd = one_line_initrd(directory / "one-line.img")

    def run_true(config: Path) -> list[str]:
        return [kabuto_bin, "--config", str(config), "run", "--rootfs", str(rootfs), "--", "/bin/true"]

    daemon = _serve([kabuto_bin, "--config", str(cached_config), "factory", "serve"], env,
                    directory / "daemon.log")
    try:
        async def cached() -> float:
            await _wait_ready(endpoint, daemon)
            return await asyncio.to_thread(_timed, run_true(cached_config), env)

        async def cold() -> float:
            return await asyncio.to_thread(_timed, run_true(cold_config), env)

        async def floor() -> float:
            return await boot_floor(table, table.kernel, floor_initrd)

        print(f"factory cache ({runs} runs each; the daemon keeps {CACHED} VMs)")
        cached_runs, cold_runs = await alternate(runs, cached, cold)
        floors = [await floor() for _ in range(runs)]
        rows = [row("cache start of kabuto run /bin/true vs a cold one", cached_runs, cold_runs),
                row("cache start vs bare QEMU one-line init", cached_runs, floors),
                row("cold start vs bare QEMU one-line init", cold_runs, floors)]

        starts = max(2 * runs, 6)

        async def per_minute(config: Path) -> float:
            if config == cached_config:
                await _wait_ready(endpoint, daemon, CACHED)
            begun = time.monotonic()
            for _ in range(starts):
                await asyncio.to_thread(_timed, run_true(config), env)
            return starts * 60 / (time.monotonic() - begun)

        with_cache, without = await alternate(1, lambda: per_minute(cached_config),
                                              lambda: per_minute(cold_config))
        rows.append(row(f"starts per minute, {starts} back to back: cache vs cold", with_cache, without,
                        unit="/min", higher_is_better=True))
        return rows
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(daemon.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                daemon.kill()
