"""Helpers for the runtime's integration tests (no tests here): bundles, the CLI, leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kabuto.hypervisor.host import choose_accelerator
from kabuto.runtime.bundle import default_spec
from kabuto.runtime.busybox import make_busybox_rootfs

# A TCG boot takes tens of seconds here; the whole call gets this long.
CLI_TIMEOUT = 300.0
# the console script installed next to this interpreter (the venv's)
KABUTO = Path(sys.executable).parent / "kabuto"


async def bare_boot_console(kernel: Path, initrd: Path, append: str, timeout: float) -> str:
    """The serial console of the image booted by QEMU with no device at all, until the guest
    powers the VM off (bounded: the VM is killed after ``timeout``)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None, "qemu-system-x86_64 is not installed"
    accel = choose_accelerator("auto").name
    proc = await asyncio.create_subprocess_exec(
        qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-M", "q35", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-m", "512",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", f"console=ttyS0 {append}",
        "-serial", "stdio",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return output.decode(errors="replace")


def require_guest_image() -> None:
    from kabuto.image import installed_image

    if installed_image() is None:
        pytest.fail("no guest image installed: run `kabuto image build` (make test does)")


def busybox_rootfs(directory: Path) -> Path:
    if shutil.which("busybox") is None:
        pytest.skip("busybox is not installed (apt-get install busybox-static)")
    return make_busybox_rootfs(directory)


def write_bundle(directory: Path, rootfs: Path, args: list[str], *, change: Any = None,
                 annotations: dict[str, str] | None = None) -> Path:
    """A bundle like `runc spec` makes, with ``args``, no terminal, and ``change(spec)`` applied."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = default_spec(args, str(rootfs))
    if annotations:
        spec["annotations"] = dict(annotations)
    if change is not None:
        change(spec)
    (directory / "config.json").write_text(json.dumps(spec, indent=2))
    return directory


def kabuto(root: Path, *args: str, input: bytes | None = None, check: bool = False,
           timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """Run the `kabuto` CLI as a separate process (as OCI tooling would) with state under ``root``.

    Its output goes to files, not pipes: `create` leaves the container's output pump holding its
    stdout and stderr (as runc's container process holds them), so pipes would not end with it.
    """
    env = {**os.environ, "KABUTO_STATE_ROOT": str(root)}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        finished = subprocess.run([str(KABUTO), *args], input=input, stdout=stdout, stderr=stderr,
                                  env=env, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        stdout.seek(0)
        stderr.seek(0)
        result = subprocess.CompletedProcess(finished.args, finished.returncode, stdout.read(), stderr.read())
    if check and result.returncode != 0:
        raise AssertionError(f"kabuto {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')}")
    return result


def runtime_leftovers(root: Path) -> list[str]:
    """Processes naming ``root``, mounts below it, and any path in it except the lock file and
    the empty VM directory root."""
    marker = str(root)
    found: list[str] = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in arg for arg in process.info.get("cmdline") or []) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"process {process.info['pid']}: {' '.join(process.info['cmdline'])[:160]}")
        except psutil.Error:
            continue
    with open("/proc/self/mountinfo") as mountinfo:
        found += [f"mount {line.split()[4]}" for line in mountinfo if line.split()[4].startswith(marker)]
    if root.exists():
        found += [f"path {p}" for p in root.rglob("*")
                  if p.relative_to(root).parts[0] not in (".lock", ".vm")]
        found += [f"path {p}" for p in (root / ".vm").glob("*")]
    return found


def assert_nothing_left(root: Path) -> None:
    leftovers = runtime_leftovers(root)
    assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers)


def new_state_root() -> Path:
    # sockets live below it: keep it short (sun_path holds 107 bytes)
    return Path(tempfile.mkdtemp(prefix="kbi-", dir="/tmp"))


def remove_state_root(root: Path) -> None:
    """Last resort after a failed test: kill what names the root, unmount, delete."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in arg for arg in process.info.get("cmdline") or []):
                process.kill()
        except psutil.Error:
            continue
    subprocess.run(["umount", "-R", "--lazy", str(root)], capture_output=True, check=False)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            if line.split()[4].startswith(str(root)):
                subprocess.run(["umount", "--lazy", line.split()[4]], capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)


def state_root_fixture() -> Iterator[Path]:
    root = new_state_root()
    try:
        yield root
        assert_nothing_left(root)
    finally:
        remove_state_root(root)
