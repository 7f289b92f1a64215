"""`make bench`: each Kabuto figure next to its floor, measured in the same run, as a ratio.

Sections:
  boot  Kabuto VM boot-to-agent-ready vs bare QEMU booting the same kernel with a one-line initrd
  run   `kabuto run /bin/true` vs that floor; exec latency vs `runc exec`;
        stdout throughput through the agent vs a raw virtio-serial copy of the same bytes
  coldstart  where a cold boot's time goes (host phases, the guest's clock, the agent's imports in
        the guest); kabuto run's and the shim's imports vs a bare interpreter; an idle sandbox's
        QEMU RSS and PSS vs an idle bare QEMU; tcg_tb_size swept for start time and RSS
  containerd  `ctr run` through the shim vs `kabuto run`; `ctr task exec` vs the same under runc;
        the shim's memory vs runc's shim
  storage  untar, find + stat, and a large write and read on a bind mount, through virtio-9p and
        virtio-fs, each vs the same busybox commands on the host
  network  TCP download throughput and small-request latency from the host netns to a pod on a CNI
        bridge, vs a runc container on the same bridge and vs a bare QEMU behind the same tap
  factory  `kabuto run /bin/true` from a VM template vs a cold boot and vs the bare-QEMU floor;
        PSS of idle templated sandboxes vs cold ones; the same start from the factory cache's booted
        VM vs a cold one and vs the floor, and starts per minute with the cache vs without
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from kabuto.bench.coldstart import coldstart_section
from kabuto.bench.containerd import containerd_section
from kabuto.bench.factory import factory_section
from kabuto.bench.factory_cache import cache_rows
from kabuto.bench.floor import boot_floor, one_line_initrd
from kabuto.bench.network import network_section
from kabuto.bench.raw_serial import bench_initrd, raw_copy_seconds
from kabuto.bench.storage import storage_section
from kabuto.hypervisor import resolve_config

#: a cold start against the bare-QEMU floor (issue 15)
COLD_START_AIM = 1.5
SECTIONS = ("boot", "run", "coldstart", "containerd", "storage", "network", "factory")


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _row(name: str, kabuto: list[float], floor: list[float], unit: str = "s", higher_is_better: bool = False,
         aim: float | None = None) -> dict[str, object]:
    k, f = _median(kabuto), _median(floor)
    ratio = (f / k) if higher_is_better else (k / f)
    goal = f"  aim {aim:g}" if aim is not None else ""
    print(f"  {name:<44} kabuto {k:9.3f} {unit:<5} floor {f:9.3f} {unit:<5} ratio {ratio:5.2f}{goal}",
          flush=True)
    return {"name": name, "kabuto": k, "floor": f, "unit": unit, "ratio": round(ratio, 3), "aim": aim,
            "kabuto_runs": kabuto, "floor_runs": floor}


async def _alternate(runs: int, first: Callable[[], Awaitable[float]], second: Callable[[], Awaitable[float]]
                     ) -> tuple[list[float], list[float]]:
    """Interleave the two measurements so machine noise falls on both alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(runs):
        a.append(await first())
        b.append(await second())
    return a, b


async def boot_section(runs: int, work: Path) -> list[dict[str, object]]:
    from kabuto.cli.vm_cmd import boot_once

    table = resolve_config().table
    floor_initrd = one_line_initrd(work / "one-line.img")

    async def kabuto_boot() -> float:
        report = await boot_once(None, None, 300.0, work / "vm")
        return report.phases["agent_ready"]

    async def floor_boot() -> float:
        return await boot_floor(table, table.kernel, floor_initrd)

    print(f"boot ({runs} runs each, {table.machine_type}, {table.default_memory} MiB, kernel {table.kernel})")
    kabuto, floor = await _alternate(runs, kabuto_boot, floor_boot)
    return [_row("boot to agent ready vs bare QEMU one-line init", kabuto, floor, aim=COLD_START_AIM)]


def _timed(args: list[str], **kwargs: object) -> float:
    start = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, timeout=300, **kwargs)  # type: ignore[call-overload]
    return time.monotonic() - start


async def run_section(runs: int, work: Path) -> list[dict[str, object]]:
    import kabuto
    from kabuto.runtime.busybox import make_busybox_rootfs

    table = resolve_config().table
    rootfs = make_busybox_rootfs(work / "rootfs")
    kabuto_bin = str(Path(sys.executable).with_name("kabuto"))
    floor_initrd = one_line_initrd(work / "one-line.img")
    rows = []

    async def kabuto_true() -> float:
        args = [kabuto_bin, "run", "--rootfs", str(rootfs), "--", "/bin/true"]
        return await asyncio.to_thread(_timed, args)

    async def floor_boot() -> float:
        return await boot_floor(table, table.kernel, floor_initrd)

    print(f"run ({runs} runs each)")
    kabuto_runs, floor = await _alternate(runs, kabuto_true, floor_boot)
    rows.append(_row("kabuto run /bin/true vs bare QEMU one-line init", kabuto_runs, floor,
                     aim=COLD_START_AIM))

    # exec latency in a running sandbox vs runc exec in a running runc container
    execs = max(runs * 4, 10)
    payload = 32 * 1024 * 1024
    with runc_container(rootfs, work) as runc_id:
        async with kabuto.AsyncSandbox(rootfs=rootfs) as sb:
            async def kabuto_exec() -> float:
                start = time.monotonic()
                result = await sb.run(["true"])
                assert result.exit_code == 0
                return time.monotonic() - start

            async def runc_exec() -> float:
                return await asyncio.to_thread(_timed, ["runc", "exec", runc_id, "true"])

            k_exec, r_exec = await _alternate(execs, kabuto_exec, runc_exec)
            rows.append(_row("exec latency vs runc exec", k_exec, r_exec))

            async def agent_stdout() -> float:
                # throughput of the stream alone: subtract an empty exec's cost measured just before
                empty = await kabuto_exec()
                start = time.monotonic()
                result = await sb.run(["head", "-c", str(payload), "/dev/zero"])
                assert len(result.stdout) == payload
                return payload / 2**20 / max(time.monotonic() - start - empty, 1e-3)

            raw_initrd = bench_initrd(Path(table.initrd), work / "raw.img", payload)

            async def raw_serial() -> float:
                seconds = await raw_copy_seconds(table, table.kernel, raw_initrd, payload, work)
                return payload / 2**20 / seconds

            k_tp, raw_tp = await _alternate(max(runs // 2, 1), agent_stdout, raw_serial)
            rows.append(_row("stdout throughput vs raw virtio-serial", k_tp, raw_tp, "MB/s",
                             higher_is_better=True))
    return rows


@contextlib.contextmanager
def runc_container(rootfs: Path, work: Path) -> Iterator[str]:
    """A detached runc container on the same rootfs, for `runc exec`."""
    runc_id = f"kabuto-bench-{secrets.token_hex(3)}"
    bundle = work / "runc-bundle"
    bundle.mkdir()
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=60)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=["sleep", "3600"])
    (bundle / "config.json").write_text(json.dumps(spec))
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(["runc", "run", "-d", "-b", str(bundle), runc_id], check=True, timeout=60, **quiet)
    try:
        yield runc_id
    finally:
        subprocess.run(["runc", "delete", "--force", runc_id], check=False, timeout=60, **quiet)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kabuto.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="kabuto-bench-") as tmp:
        work = Path(tmp)
        if args.section in ("boot", "all"):
            rows += asyncio.run(boot_section(args.runs, work))
        if args.section in ("run", "all"):
            rows += asyncio.run(run_section(args.runs, work))
        if args.section in ("coldstart", "all"):
            rows += asyncio.run(coldstart_section(args.runs, work, _row, _alternate))
        if args.section in ("containerd", "all"):
            rows += asyncio.run(containerd_section(args.runs, work, _row, _alternate))
        if args.section in ("storage", "all"):
            rows += asyncio.run(storage_section(args.runs, work, _row))
        if args.section in ("network", "all"):
            rows += asyncio.run(network_section(args.runs, work, _row))
        if args.section in ("factory", "all"):
            rows += asyncio.run(factory_section(args.runs, work, _row, _alternate))
            rows += asyncio.run(cache_rows(args.runs, work, _row, _alternate))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
