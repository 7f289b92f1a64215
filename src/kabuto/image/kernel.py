"""Kabuto's own guest kernel: Debian's ``linux-source`` built with the checked-in kernel.config.

``make tinyconfig`` plus the fragment gives a kernel with everything the guest needs built in
and nothing else; under TCG it boots in well under half the generic kernel's time
(docs/guest-image.md). The build takes ~10 minutes on two cores, so its result is cached in
``<cache>/kernel/<key>/`` keyed by the source package's version and the fragment's options,
and is made at most once per machine. It is built in a temporary directory beside that and
renamed into place only when complete; a failed or timed-out build leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kabuto.errors import ImageError
from kabuto.image import debian, elf

SOURCE_PACKAGE = "linux-source-6.1"
FRAGMENT = Path(__file__).with_name("kernel.config")
KERNEL_NAME = "vmlinux"
RECORD_NAME = "kernel.json"
CONFIG_NAME = "config"
# Debian packages of the tools the build runs (libelf-dev for objtool); checked up front so a
# missing one is named before minutes of unpacking.
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "tar": "tar", "xz": "xz-utils"}
BUILD_HEADERS = {"/usr/include/gelf.h": "libelf-dev"}
UNPACK_TIMEOUT = 900.0
CONFIGURE_TIMEOUT = 300.0
# ~1000 CPU-seconds on an idle host; a shared one can be several times slower.
MAKE_TIMEOUT = 3600.0
#: seconds between two reports of how far the compile got
HEARTBEAT_INTERVAL = 30.0
_OUTPUT_TAIL = 3000

_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class CustomKernel:
    vmlinux: Path
    release: str
    key: str


def parse_config(text: str, source: str = "kernel config") -> dict[str, str]:
    """``CONFIG_X`` -> value of a fragment or .config; ``# CONFIG_X is not set`` reads as ``n``.

    Other comments and blank lines are skipped; a later line for the same option wins, as in
    Kconfig itself. Anything else is an error naming the line.
    """
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not_set := _NOT_SET.match(line):
            options[not_set.group(1)] = "n"
        elif option := _OPTION.match(line):
            options[option.group(1)] = option.group(2)
        elif line and not line.startswith("#"):
            raise ImageError(f"{source} line {number}: {raw!r} is not CONFIG_NAME=value")
    return options


def fragment_options(path: Path = FRAGMENT) -> dict[str, str]:
    try:
        return parse_config(path.read_text(), str(path))
    except OSError as exc:
        raise ImageError(f"cannot read the kernel config fragment {path}: {exc}") from exc


def kernel_key(source: debian.Package, options: dict[str, str]) -> str:
    """The cache key: the source package's version and the fragment's options (not its comments)."""
    canonical = json.dumps({"source": source.spec, "options": options}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def unmet_options(wanted: dict[str, str], final: dict[str, str]) -> list[str]:
    """Fragment lines that ``make olddefconfig`` dropped or changed (an unmet dependency)."""
    unmet = []
    for name, value in wanted.items():
        got = final.get(name, "n")
        if got != value and not (value == "n" and got == ""):
            unmet.append(f"{name}={value} (got {got})")
    return unmet


def missing_build_tools() -> list[str]:
    """Debian packages the build needs that this host lacks."""
    missing = [package for tool, package in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [package for header, package in BUILD_HEADERS.items() if not Path(header).is_file()]
    return sorted(set(missing))


def kernel_root(cache: Path) -> Path:
    return cache / "kernel"


def cached_kernel(cache: Path, key: str) -> CustomKernel | None:
    target = kernel_root(cache) / key
    try:
        record = json.loads((target / RECORD_NAME).read_text())
        release = str(record["release"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    vmlinux = target / KERNEL_NAME
    return CustomKernel(vmlinux, release, key) if vmlinux.is_file() else None


async def build_kernel(source: debian.Package, cache: Path, options: dict[str, str],
                       jobs: int | None = None,
                       heartbeat: Callable[[str], None] | None = None) -> CustomKernel:
    """The kernel for ``source`` + ``options`` from the cache, built first if it is not there.
    ``heartbeat`` hears how far the compile got, every HEARTBEAT_INTERVAL seconds.

    The caller holds the image build lock, so no other build runs in ``<cache>/kernel``.
    """
    key = kernel_key(source, options)
    root = kernel_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".build-*"):  # of a build that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    found = cached_kernel(cache, key)
    if found is not None:
        return found
    missing = missing_build_tools()
    if missing:
        raise ImageError(f"building the guest kernel needs {', '.join(missing)} "
                         f"(apt-get install {' '.join(missing)})")
    staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        deb, = await debian.download([source], cache / "debs")
        release = await _compile(deb, staging, options, jobs or os.cpu_count() or 1, heartbeat=heartbeat)
        out = staging / key
        out.mkdir()
        shutil.move(staging / "out" / KERNEL_NAME, out / KERNEL_NAME)
        shutil.copy2(staging / "out" / ".config", out / CONFIG_NAME)
        (out / RECORD_NAME).write_text(json.dumps({"release": release, "source": source.spec}) + "\n")
        out.rename(root / key)
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    # one custom kernel per machine: an older fragment's build is not used again
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != key:
            shutil.rmtree(entry, ignore_errors=True)
    return CustomKernel(root / key / KERNEL_NAME, release, key)


async def _compile(deb: Path, staging: Path, options: dict[str, str], jobs: int,
                   heartbeat: Callable[[str], None] | None = None) -> str:
    """Unpack the source, configure it with ``options`` and build vmlinux; its kernel release.
    ``heartbeat`` hears each phase begin (unpacking and configuring print nothing for minutes too)."""
    say = heartbeat or (lambda detail: None)
    say(f"unpacking {deb.name}")
    unpacked = staging / "deb"
    await debian.extract(deb, unpacked)
    tarballs = sorted((unpacked / "usr" / "src").glob("linux-source-*.tar.*"))
    if len(tarballs) != 1:
        raise ImageError(f"expected one source tarball in {deb.name}, found {[t.name for t in tarballs]}")
    await _run(["tar", "-xf", str(tarballs[0]), "-C", str(staging)], UNPACK_TIMEOUT)
    source_dir = staging / tarballs[0].name.split(".tar.")[0]
    await asyncio.to_thread(shutil.rmtree, unpacked, True)
    out = staging / "out"
    make = ["make", "-s", "-C", str(source_dir), f"O={out}"]
    say(f"configuring {source_dir.name}")
    await _run([*make, "tinyconfig"], CONFIGURE_TIMEOUT)
    config = out / ".config"
    with config.open("a") as merged:
        merged.writelines(f"{name}={value}\n" for name, value in options.items())
    await _run([*make, "olddefconfig"], CONFIGURE_TIMEOUT)
    unmet = unmet_options(options, parse_config(config.read_text(), str(config)))
    if unmet:
        raise ImageError(f"kernel options in {FRAGMENT.name} not accepted by {source_dir.name} "
                         f"(unmet dependencies?): {', '.join(unmet)}")
    say(f"compiling with {jobs} jobs")
    ticker = asyncio.create_task(_count_objects(out, heartbeat)) if heartbeat else None
    try:
        await _run([*make, f"-j{jobs}", KERNEL_NAME], MAKE_TIMEOUT)
    finally:
        if ticker is not None:
            ticker.cancel()
    if not elf.has_pvh_entry((out / KERNEL_NAME).read_bytes()):
        raise ImageError("the built vmlinux has no PVH entry note (is CONFIG_PVH in the fragment?)")
    return (await _run([*make, "kernelrelease"], CONFIGURE_TIMEOUT)).strip().splitlines()[-1]


async def _count_objects(out: Path, heartbeat: Callable[[str], None]) -> None:
    """make -s prints nothing for minutes: say how many objects exist so far."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        objects = await asyncio.to_thread(lambda: sum(1 for _ in out.rglob("*.o")))
        heartbeat(f"{objects} objects compiled in {time.monotonic() - started:.0f} s")


async def _run(args: list[str], timeout: float) -> str:
    """Run a build command in its own process group, so a timeout also ends make's compilers."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise ImageError(f"{' '.join(args[:5])} ... did not finish within {timeout:.0f} s") from None
        raise
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace")[-_OUTPUT_TAIL:].strip()
        raise ImageError(f"{' '.join(args)} failed (exit {proc.returncode}): {detail}")
    return out.decode(errors="replace")
