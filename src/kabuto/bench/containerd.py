"""The containerd section of `make bench`: Kabuto through containerd-shim-kabuto-v2, side by side
with what it wraps (the runtime driven directly) and with containerd's runc shim.

A private containerd (root, state and sockets in the work directory, CRI off) serves both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil

KABUTO_RUNTIME = "io.containerd.kabuto.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
NAMESPACE = "bench"
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 300.0
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]

Row = Callable[..., dict[str, object]]
Alternate = Callable[[int, Callable[[], Awaitable[float]], Callable[[], Awaitable[float]]],
                     Awaitable[tuple[list[float], list[float]]]]


class PrivateContainerd:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.address = str(directory / "containerd.sock")
        # the shims' state root holds sockets: keep its path short
        self.state_root = Path(tempfile.mkdtemp(prefix="kbb-", dir="/tmp"))
        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "KABUTO_STATE_ROOT": str(self.state_root)}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.directory / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{self.directory}/root"\nstate = "{self.directory}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n')
        with open(self.directory / "containerd.log", "ab") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"containerd did not start; see {self.directory}/containerd.log")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.state_root, ignore_errors=True)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
                              stdin=subprocess.DEVNULL, capture_output=True, check=check,
                              timeout=COMMAND_TIMEOUT)

    def timed(self, *args: str) -> float:
        start = time.monotonic()
        self.ctr(*args)
        return time.monotonic() - start

    @contextlib.contextmanager
    def task(self, runtime: str, task_id: str, rootfs: Path) -> Iterator[str]:
        """A detached task; killed and deleted afterwards."""
        self.ctr("run", "-d", "--runtime", runtime, "--rootfs", str(rootfs), task_id, *SLEEPER)
        try:
            yield task_id
        finally:
            self.ctr("task", "kill", "-s", "KILL", task_id, check=False)
            deadline = time.monotonic() + START_TIMEOUT
            while self.ctr("task", "delete", task_id, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            self.ctr("container", "delete", task_id, check=False)

    def shim_rss_mib(self, binary: str) -> float:
        """Resident memory of this containerd's shim processes whose command line names ``binary``."""
        total = 0
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info.get("cmdline") or [])
            if binary in cmdline and self.address in cmdline:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
        return total / 2**20


async def containerd_section(runs: int, work: Path, row: Row, alternate: Alternate
                             ) -> list[dict[str, object]]:
    from kabuto.runtime.busybox import make_busybox_rootfs

    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        print("containerd: skipped (containerd or ctr is not installed)")
        return []
    rootfs = make_busybox_rootfs(work / "containerd-rootfs")
    kabuto_bin = str(Path(sys.executable).with_name("kabuto"))
    directory = work / "ctd"
    directory.mkdir()
    daemon = PrivateContainerd(directory)
    daemon.start()
    rows = []
    counter = iter(range(10**6))
    try:
        async def through_shim() -> float:
            args = ["run", "--rm", "--runtime", KABUTO_RUNTIME, "--rootfs", str(rootfs), f"r{next(counter)}",
                    "/bin/true"]
            return await asyncio.to_thread(daemon.timed, *args)

        async def direct() -> float:
            start = time.monotonic()
            await asyncio.to_thread(subprocess.run, [kabuto_bin, "run", "--rootfs", str(rootfs), "--",
                                                     "/bin/true"], check=True, env=daemon.env,
                                    stdout=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT)
            return time.monotonic() - start

        print(f"containerd ({runs} runs each, containerd {_containerd_version()})")
        shim, cli = await alternate(runs, through_shim, direct)
        rows.append(row("ctr run /bin/true (shim) vs kabuto run", shim, cli))

        with daemon.task(KABUTO_RUNTIME, "kabuto-task", rootfs), \
                daemon.task(RUNC_RUNTIME, "runc-task", rootfs):
            def exec_in(task_id: str) -> Callable[[], Awaitable[float]]:
                async def measure() -> float:
                    return await asyncio.to_thread(daemon.timed, "task", "exec", "--exec-id",
                                                   f"e{next(counter)}", task_id, "/bin/true")
                return measure

            kabuto_exec, runc_exec = await alternate(max(runs * 2, 6), exec_in("kabuto-task"),
                                                     exec_in("runc-task"))
            rows.append(row("ctr task exec vs the same under runc", kabuto_exec, runc_exec))
            rows.append(row("shim resident memory vs runc's shim", [daemon.shim_rss_mib("kabuto.shim")],
                            [daemon.shim_rss_mib("containerd-shim-runc-v2")], "MiB"))
    finally:
        daemon.stop()
    return rows


def _containerd_version() -> str:
    result = subprocess.run(["containerd", "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout.split()[2] if result.returncode == 0 and len(result.stdout.split()) > 2 else "?"
