"""`make bench` factory section: template mode against a cold boot and the bare-QEMU floor.

- `kabuto run /bin/true` started from a template vs the same configuration booting cold, and vs
  bare QEMU booting the same kernel to a one-line init (both interleaved, as everywhere here);
- PSS (proportional set size: a page shared by N processes counts 1/N in each) of the QEMU
  processes of N idle templated sandboxes vs N idle cold ones: what sharing the template's
  pages saves.

Both configurations use virtio-9p (template mode needs it), so the template is the only difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from kabuto.bench.floor import boot_floor, one_line_initrd
from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import resolve_config

IDLE_SANDBOXES = 10

Row = Callable[..., dict[str, object]]
Alternate = Callable[[int, Callable[[], Awaitable[float]], Callable[[], Awaitable[float]]],
                     Awaitable[tuple[list[float], list[float]]]]


def write_configs(work: Path) -> tuple[Path, Path]:
    """(templated, cold): the built-in configuration with virtio-9p, one with template mode on."""
    paths = []
    for name, factory in (("templated", True), ("cold", False)):
        directory = work / f"config-{name}"
        (directory / "config.d").mkdir(parents=True)
        (directory / "configuration.toml").write_text(builtin_default_text())
        (directory / "config.d" / "50-factory.toml").write_text(
            '[hypervisor.qemu]\nshared_fs = "virtio-9p"\n'
            f'[hypervisor.qemu.factory]\nenable_template = {str(factory).lower()}\n'
            f'template_path = "{work / "templates"}"\n')
        paths.append(directory / "configuration.toml")
    return paths[0], paths[1]


def _timed(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return time.monotonic() - start


async def _pss_of_idle(config: Path, rootfs: Path, count: int, state_root: Path) -> float:
    """MiB of PSS summed over the QEMU processes of ``count`` idle sandboxes."""
    import kabuto

    async with contextlib.AsyncExitStack() as stack:
        pids = []
        for _ in range(count):
            sb = await stack.enter_async_context(kabuto.AsyncSandbox(config=str(config), rootfs=rootfs,
                                                                     state_root=state_root))
            pids += await sb.sandbox.hypervisor.get_pids()
        await asyncio.sleep(2)  # idle: what boot or restore touched is all they hold
        return sum(psutil.Process(pid).memory_full_info().pss for pid in pids) / 2**20


async def factory_section(runs: int, work: Path, row: Row, alternate: Alternate,
                          idle: int = IDLE_SANDBOXES) -> list[dict[str, Any]]:
    from kabuto.runtime.busybox import make_busybox_rootfs

    templated, cold = write_configs(work)
    table = resolve_config(str(cold)).table
    rootfs = make_busybox_rootfs(work / "factory-rootfs")
    kabuto_bin = str(Path(sys.executable).with_name("kabuto"))
    state_root = work / "factory-state"
    await asyncio.to_thread(_timed, [kabuto_bin, "--config", str(templated), "factory", "init",
                                     "--jailer-root", str(state_root / ".vm")])
    floor_initrd = one_line_initrd(work / "factory-one-line.img")

    def run_true(config: Path) -> Callable[[], Awaitable[float]]:
        args = [kabuto_bin, "--config", str(config), "--root", str(state_root), "run", "--rootfs",
                str(rootfs), "--", "/bin/true"]
        return lambda: asyncio.to_thread(_timed, args)

    async def floor() -> float:
        return await boot_floor(table, table.kernel, floor_initrd)

    print(f"factory ({runs} runs each; PSS of {idle} idle sandboxes each)")
    rows = []
    warm, cold_runs = await alternate(runs, run_true(templated), run_true(cold))
    rows.append(row("template run /bin/true vs cold run", warm, cold_runs))
    warm2, floor_runs = await alternate(runs, run_true(templated), floor)
    rows.append(row("template run /bin/true vs bare QEMU init", warm2, floor_runs))
    pss_warm = await _pss_of_idle(templated, rootfs, idle, state_root)
    pss_cold = await _pss_of_idle(cold, rootfs, idle, state_root)
    rows.append(row(f"PSS of {idle} idle templated vs cold", [pss_warm], [pss_cold], "MiB"))
    await asyncio.to_thread(_timed, [kabuto_bin, "--config", str(templated), "factory", "destroy"])
    return rows
