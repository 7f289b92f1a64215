"""The cold start, taken apart, and what an idle sandbox costs in memory.

* where a cold boot's time goes: the host's phases (QEMU spawned, QMP answering, the guest's
  agent port open, the agent answering) and the guest's own clock (kernel until /init, /init
  until the agent's code runs, the agent's start until it serves);
* the guest's user-space start measured inside the guest: the same kernel and initrd with a small
  cpio appended (selected with ``rdinit=``) that stamps /proc/uptime around /init's mounts, a bare
  ``python3 -S``, and the agent's imports, then prints ``-X importtime``'s heaviest modules;
* the host's own start: what ``kabuto run`` and the shim import before any work, against a bare
  interpreter;
* memory: QEMU's resident and proportional set of an idle sandbox against a bare QEMU idling on the
  same kernel, and the TCG translation cache size (``tcg_tb_size``) swept for boot time and RSS.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

import kabuto
from kabuto.bench.floor import MARKER, bare_qemu_args, one_line_initrd, pack_initrd
from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor import resolve_config

Row = Callable[..., dict[str, object]]

#: tcg_tb_size values swept (MiB; 0 is QEMU's own default)
TB_SIZES = (0, 32, 64)
GUEST_MARK = "KABUTO-STAMP"
IMPORTTIME_TOP = 16
# stamps the guest's clock around each step; `read` is a shell builtin, so a stamp forks nothing
GUEST_STEPS_INIT = """#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/usr/lib/kabuto PYTHONDONTWRITEBYTECODE=1 PYTHONUTF8=1
stamp() {{ read -r up _ < /proc/uptime; echo "{mark} $1 $up" > /dev/console; }}
mount -t proc -o nosuid,nodev,noexec proc /proc
stamp proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
stamp mounts
python3 -S -c pass
stamp python
python3 -S -c pass
stamp python2
python3 -S -c 'import kabuto.guest.__main__'
stamp imports
python3 -S -c 'import kabuto.guest.__main__'
stamp imports2
python3 -S -c 'import kabuto.guest.__main__, kabuto.guest.containers'
stamp containers
python3 -S -X importtime -c 'import kabuto.guest.__main__' 2> /dev/console
poweroff -f
"""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def boot_breakdown(runs: int, work: Path) -> dict[str, list[float]]:
    """Each phase of ``kabuto vm boot`` (seconds since QEMU's spawn, or on the guest's clock)."""
    from kabuto.cli.vm_cmd import boot_once

    phases: dict[str, list[float]] = {}
    for _ in range(runs):
        report = await boot_once(None, None, 300.0, work / "vm")
        for name, seconds in report.phases.items():
            phases.setdefault(name, []).append(seconds)
    return phases


def _guest_initrd(table: HypervisorConfig, dest: Path) -> Path:
    extra = pack_initrd(dest.with_suffix(".extra"),
                        {"steps-init": GUEST_STEPS_INIT.format(mark=GUEST_MARK).encode()})
    base = Path(table.initrd).read_bytes()
    # an uncompressed archive is padded to 4 bytes before the next one starts
    dest.write_bytes(base + b"\0" * (-len(base) % 4) + extra.read_bytes())
    extra.unlink()
    return dest


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def guest_steps(table: HypervisorConfig, initrd: Path, timeout: float = 300.0
                      ) -> tuple[dict[str, tuple[float, float]], list[tuple[int, str]]]:
    """Each stamp's guest clock and QEMU's CPU seconds when the host read it (on a shared host the
    CPU time is the steadier of the two), and ``-X importtime``'s heaviest imports (cumulative,
    so a package includes what it imports)."""
    args = [*bare_qemu_args(table, table.kernel, initrd, "console=ttyS0 quiet panic=-1 rdinit=/steps-init"),
            "-serial", "stdio"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    stamps: dict[str, tuple[float, float]] = {}
    imports: list[tuple[int, str]] = []
    tail = b""
    try:
        async with asyncio.timeout(timeout):
            while raw := await proc.stdout.readline():  # type: ignore[union-attr]
                tail = (tail + raw)[-600:]
                line = raw.decode(errors="replace").strip()
                if GUEST_MARK in line:  # a stamp may follow the kernel's last line on the console
                    _, name, uptime = line[line.index(GUEST_MARK):].split()
                    stamps[name] = (float(uptime), cpu_seconds(proc.pid))
                elif line.startswith("import time:") and "cumulative" not in line:
                    _, cumulative, module = line.split("|")
                    imports.append((int(cumulative), module.strip()))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    if "containers" not in stamps:
        raise RuntimeError(f"the guest printed no stamps; output tail: {tail!r}")
    return stamps, sorted(imports, reverse=True)[:IMPORTTIME_TOP]


def _import_seconds(code: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    return time.monotonic() - start


def _rss_pss_mib(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


async def idle_floor_memory(table: HypervisorConfig, initrd: Path, settle: float) -> tuple[float, float]:
    """RSS and PSS of a bare QEMU whose one-line init printed its marker and then idles."""
    args = [*bare_qemu_args(table, table.kernel, initrd, "console=ttyS0 quiet panic=-1"), "-serial", "stdio"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        seen = b""
        async with asyncio.timeout(120):
            while MARKER not in seen:
                chunk = await proc.stdout.read(4096)  # type: ignore[union-attr]
                if not chunk:
                    raise RuntimeError(f"bare QEMU exited before the marker: {seen[-400:]!r}")
                seen = seen[-8192:] + chunk
        await asyncio.sleep(settle)
        return _rss_pss_mib(proc.pid)
    finally:
        proc.kill()
        await proc.wait()


def config_with_tb_size(dest: Path, tb_size: int) -> Path:
    """The built-in configuration with only ``[hypervisor.qemu] tcg_tb_size`` changed."""
    text = files("kabuto.config").joinpath("default.toml").read_text()
    dest.write_text(text.replace("[hypervisor.qemu]\n", f"[hypervisor.qemu]\ntcg_tb_size = {tb_size}\n", 1))
    return dest


async def sandbox_start_and_memory(config: Path | None, rootfs: Path, settle: float
                                   ) -> tuple[float, float, float]:
    """Seconds to a started sandbox that ran ``true``, then QEMU's RSS and PSS while it idles."""
    start = time.monotonic()
    async with kabuto.AsyncSandbox(config=str(config) if config else None, rootfs=rootfs) as sb:
        result = await sb.run(["true"])
        seconds = time.monotonic() - start
        assert result.exit_code == 0
        await asyncio.sleep(settle)
        pids = await sb.sandbox.hypervisor.get_pids()
        rss, pss = _rss_pss_mib(pids[0])
    return seconds, rss, pss


async def coldstart_section(runs: int, work: Path, row: Row,
                            alternate: Callable[[int, Callable[[], Awaitable[float]],
                                                 Callable[[], Awaitable[float]]],
                                                Awaitable[tuple[list[float], list[float]]]]
                            ) -> list[dict[str, object]]:
    from kabuto.runtime.busybox import make_busybox_rootfs

    table = resolve_config().table
    rows: list[dict[str, object]] = []
    settle = 3.0

    print(f"cold start ({runs} runs each; tcg_tb_size {table.tcg_tb_size} MiB)")
    phases = await boot_breakdown(runs, work)
    print("  where `kabuto vm boot`'s time goes (medians, seconds):")
    for name, values in phases.items():
        print(f"    {_median(values):7.3f}  {name}")

    steps_initrd = _guest_initrd(table, work / "steps.img")
    stamp_runs = [await guest_steps(table, steps_initrd) for _ in range(max(runs // 2, 1))]
    stamps = [s for s, _ in stamp_runs]

    def step(later: str, earlier: str | None) -> str:
        wall = _median([s[later][0] - (s[earlier][0] if earlier else 0.0) for s in stamps])
        cpu = _median([s[later][1] - (s[earlier][1] if earlier else 0.0) for s in stamps])
        return f"{wall:7.3f} {cpu:7.3f}"

    print("  the guest's user-space start (medians: seconds on the guest's clock, QEMU's CPU seconds):")
    for label, later, earlier in (
            ("kernel until /init mounted /proc (one fork)", "proc", None),
            ("/init's other mounts (8 forks)", "mounts", "proc"),
            ("python3 -S -c pass, the first", "python", "mounts"),
            ("python3 -S -c pass again (its code translated already)", "python2", "python"),
            ("python3 -S importing the agent (what runs before its first answer)", "imports", "python2"),
            ("... again", "imports2", "imports"),
            ("... with ContainerService (loaded after the first answer)", "containers", "imports2")):
        print(f"    {step(later, earlier)}  {label}")
    print("  the agent's heaviest imports in the guest (-X importtime, cumulative ms):")
    for cumulative, module in stamp_runs[-1][1]:
        print(f"    {cumulative / 1000:7.0f}  {module}")
    rows.append({"name": "guest steps", "stamps": stamps})

    async def run_imports() -> float:
        return await asyncio.to_thread(_import_seconds, "import kabuto.cli.main, kabuto.cli.runtime_cmd")

    async def shim_imports() -> float:
        return await asyncio.to_thread(_import_seconds, "import kabuto.shim.cli")

    async def bare() -> float:
        return await asyncio.to_thread(_import_seconds, "pass")

    cli, floor = await alternate(runs * 2, run_imports, bare)
    rows.append(row("kabuto run's imports vs bare python", cli, floor, aim=None))
    shim, floor = await alternate(runs * 2, shim_imports, bare)
    rows.append(row("the shim's imports vs bare python", shim, floor, aim=None))

    rootfs = make_busybox_rootfs(work / "coldstart-rootfs")
    floor_initrd = one_line_initrd(work / "idle.img", idle=True)
    rss, pss, floor_rss, floor_pss = [], [], [], []
    for _ in range((runs + 1) // 2):
        _, r, p = await sandbox_start_and_memory(None, rootfs, settle)
        rss.append(r)
        pss.append(p)
        r, p = await idle_floor_memory(table, floor_initrd, settle)
        floor_rss.append(r)
        floor_pss.append(p)
    rows.append(row("idle sandbox QEMU RSS vs idle bare QEMU", rss, floor_rss, "MiB", aim=None))
    rows.append(row("idle sandbox QEMU PSS vs idle bare QEMU", pss, floor_pss, "MiB", aim=None))

    print(f"  tcg_tb_size swept ({(runs + 1) // 2} sandboxes each, interleaved; 0 is QEMU's default):")
    sweep: dict[int, list[tuple[float, float, float]]] = {size: [] for size in TB_SIZES}
    configs = {size: config_with_tb_size(work / f"tb-{size}.toml", size) for size in TB_SIZES}
    for _ in range((runs + 1) // 2):
        for size in TB_SIZES:
            sweep[size].append(await sandbox_start_and_memory(configs[size], rootfs, settle))
    print(f"    {'tb-size MiB':>11}  {'start + true':>12}  {'QEMU RSS':>9}  {'QEMU PSS':>9}")
    for size, values in sweep.items():
        seconds, r, p = (_median([v[i] for v in values]) for i in range(3))
        print(f"    {size or 'default':>11}  {seconds:10.2f} s  {r:5.0f} MiB  {p:5.0f} MiB")
        rows.append({"name": f"tcg_tb_size {size}", "start_seconds": seconds, "qemu_rss_mib": r,
                     "qemu_pss_mib": p, "runs": values})
    return rows
