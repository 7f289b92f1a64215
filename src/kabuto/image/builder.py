"""Assemble the guest image: a Debian kernel and an initramfs holding busybox, Python and the agent.

The image lives in ``<cache>/image/<key>/`` where the key hashes every input (package
versions, this builder's code, the guest code, the protobuf version, the options), so a
changed input gives a new directory and an unchanged one is reused. A build happens in a
temporary directory beside it and is renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kabuto.errors import ImageError
from kabuto.image import debian, kernel
from kabuto.image.rootfs import (
    GUEST_CODE,
    _check_imports,
    _compile_python,
    _drop_sources,
    _install_custom_kernel,
    _install_guest_code,
    _install_kernel,
    _install_libraries,
    _install_userland,
    _write_init,
    _write_initramfs,
    package_dir,
    protobuf_dir,
)

DEFAULT_CACHE_DIR = Path("/var/cache/kabuto")
CACHE_ENV = "KABUTO_CACHE_DIR"
CURRENT_RECORD = "current.json"
MANIFEST = "manifest.json"
# The uncompressed ELF kernel, booted through its PVH entry: under TCG the guest spends about
# as long decompressing a bzImage as booting, so this halves boot time (docs/qemu.md).
KERNEL_NAME = "vmlinux"
INITRD_NAME = "initrd.img"

# Kernel flavours: the package each one's kernel comes from (a metapackage tracking Debian's
# build, or for "custom" the source Kabuto builds its own kernel from, see kernel.py).
KERNEL_PACKAGES = {"generic": "linux-image-amd64", "cloud": "linux-image-cloud-amd64",
                   "custom": kernel.SOURCE_PACKAGE}
CUSTOM_FLAVOUR = "custom"
# Kabuto's own kernel: has 9p (which Debian's cloud kernel lacks) and boots to the agent ~1.4 s
# sooner than the generic one under TCG (docs/guest-image.md); built once per machine.
DEFAULT_FLAVOUR = "custom"
COMPRESSIONS = ("none", "lz4", "gzip", "zstd")
# Uncompressed reaches /init ~1 CPU-second sooner than gzip under TCG, as fast as lz4 and
# without a tool to depend on (docs/guest-image.md); the cost is ~20 MB more read into the VM.
DEFAULT_COMPRESSION = "none"
USERLAND_PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    # shared libraries of the interpreter and of the extension modules kept
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    # protobuf's C extension (upb) is C++: it imports the agent's messages ~20% faster than
    # protobuf's pure-Python implementation under TCG (see docs/guest-image.md)
    "libstdc++6",
    "libgcc-s1",
)
# The builder's own files that decide the image's bytes (the others only find or fetch things).
BUILDER_FILES = ("builder.py", "rootfs.py", "modules.py", "cpio.py", "elf.py", "init.sh", "kernel.py")
# another build holds the lock at most this long (a custom kernel build included)
LOCK_TIMEOUT = 1800.0 + kernel.MAKE_TIMEOUT

STEPS = (
    "resolving packages",
    "downloading packages",
    "extracting packages",
    "building the custom kernel (once per machine, ~10 min)",
    "kernel and modules",
    "busybox, python and libraries",
    "agent and protobuf",
    "compiling python",
    "writing the initramfs",
    "installing into the cache",
)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: the kernel and the initramfs to boot it with."""

    kernel: Path
    initrd: Path
    key: str = ""
    kernel_version: str = ""
    flavour: str = ""
    compression: str = ""
    guest_code_hash: str = ""
    missing_modules: tuple[str, ...] = ()
    dropped_extensions: tuple[str, ...] = ()
    built_at: str = ""

    @property
    def guest_code_current(self) -> bool:
        """False when Kabuto's guest code changed since this image was built."""
        return self.guest_code_hash == guest_code_hash()

    def to_record(self) -> dict[str, object]:
        record = asdict(self)
        record.update(kernel=str(self.kernel), initrd=str(self.initrd))
        for name in ("missing_modules", "dropped_extensions"):
            record[name] = list(record[name])
        return record

    @classmethod
    def from_record(cls, record: dict[str, object]) -> GuestImage:
        fields = {**record}
        fields["kernel"] = Path(str(record["kernel"]))
        fields["initrd"] = Path(str(record["initrd"]))
        for name in ("missing_modules", "dropped_extensions"):
            fields[name] = tuple(record.get(name) or ())  # type: ignore[call-overload]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in fields.items() if k in known})  # type: ignore[arg-type]


@dataclass(frozen=True)
class BuildInputs:
    """Everything the image's bytes depend on; its key names the cache directory."""

    flavour: str
    compression: str
    packages: tuple[debian.Package, ...]
    builder_hash: str
    guest_code_hash: str
    protobuf_version: str
    extra: dict[str, str] = field(default_factory=dict)

    def key(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def image_root() -> Path:
    return cache_dir() / "image"


def hash_files(root: Path, entries: Iterable[str], suffixes: tuple[str, ...]) -> str:
    """A hash of the relative paths and contents of the files under ``root``/``entries``."""
    digest = hashlib.sha256()
    for entry in entries:
        base = root / entry
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in suffixes or "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def guest_code_hash() -> str:
    return hash_files(package_dir(), GUEST_CODE, (".py",))


def builder_hash() -> str:
    return hash_files(Path(__file__).parent, BUILDER_FILES, (".py", ".sh"))


async def gather_inputs(
    flavour: str = DEFAULT_FLAVOUR, compression: str = DEFAULT_COMPRESSION
) -> BuildInputs:
    """Resolve package versions against apt's lists (no download) and hash the local inputs."""
    if flavour not in KERNEL_PACKAGES:
        raise ImageError(f"unknown kernel flavour {flavour!r}: choose one of {', '.join(KERNEL_PACKAGES)}")
    if compression not in COMPRESSIONS:
        raise ImageError(
            f"unknown initramfs compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}"
        )
    meta, *userland = await debian.resolve([KERNEL_PACKAGES[flavour], *USERLAND_PACKAGES])
    extra = {}
    if flavour == CUSTOM_FLAVOUR:
        kernel_package = meta
        extra["kernel"] = kernel.kernel_key(meta, kernel.fragment_options())
    else:
        kernel_package, = await debian.resolve([await debian.dependency_of(meta, "linux-image-")])
    return BuildInputs(
        flavour=flavour,
        compression=compression,
        packages=(kernel_package, *userland),
        builder_hash=builder_hash(),
        guest_code_hash=guest_code_hash(),
        protobuf_version=protobuf_dir()[1],
        extra=extra,
    )


def installed_image() -> GuestImage | None:
    """The image the cache records as current, or None; never builds and never goes online."""
    try:
        record = json.loads((image_root() / CURRENT_RECORD).read_text())
        image = GuestImage.from_record(record)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


async def build_image(
    force: bool = False,
    flavour: str = DEFAULT_FLAVOUR,
    compression: str = DEFAULT_COMPRESSION,
    progress: Progress | None = None,
) -> GuestImage:
    """The image for the current inputs, built only if the cache does not hold it yet (or ``force``)."""
    report = progress or (lambda step: None)
    report(STEPS[0])
    inputs = await gather_inputs(flavour, compression)
    root = image_root()
    root.mkdir(parents=True, exist_ok=True)
    async with _build_lock(root):
        _remove_abandoned(root)
        target = root / inputs.key()
        cached = _read_manifest(target)
        if cached is not None and not force:
            _set_current(root, cached)
            return cached
        previous = installed_image()
        image = await _build(inputs, root, report)
        _set_current(root, image)
        keep = {target.name} | ({previous.key} if previous else set())
        _prune(root, keep, deb_prefixes=[p.deb_prefix() for p in inputs.packages])
        return image


async def _build(inputs: BuildInputs, root: Path, report: Progress) -> GuestImage:
    key = inputs.key()
    staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        # the kernel source is not unpacked with the guest's packages: kernel.py builds from it
        source = inputs.packages[0] if inputs.flavour == CUSTOM_FLAVOUR else None
        packages = list(inputs.packages[1:] if source else inputs.packages)
        report(STEPS[1])
        debs = await debian.download(packages, cache_dir() / "debs")
        report(STEPS[2])
        debroot = staging / "debroot"
        for deb in debs:
            await debian.extract(deb, debroot)
        rootfs = staging / "rootfs"
        out = staging / key
        out.mkdir()
        if source is not None:
            report(STEPS[3])
            built = await kernel.build_kernel(source, cache_dir(), kernel.fragment_options())
            report(STEPS[4])
            kernel_version, missing = await asyncio.to_thread(_install_custom_kernel, built, rootfs,
                                                              out / KERNEL_NAME)
        else:
            report(STEPS[4])
            kernel_version, missing = await asyncio.to_thread(_install_kernel, debroot, rootfs,
                                                              out / KERNEL_NAME)
        report(STEPS[5])
        await asyncio.to_thread(_install_userland, debroot, rootfs)
        report(STEPS[6])
        await asyncio.to_thread(_install_guest_code, rootfs)
        dropped = await asyncio.to_thread(_install_libraries, debroot, rootfs)
        _write_init(rootfs)
        report(STEPS[7])
        await _compile_python(rootfs)
        await asyncio.to_thread(_drop_sources, rootfs)
        await _check_imports(rootfs)
        report(STEPS[8])
        await _write_initramfs(rootfs, out / INITRD_NAME, inputs.compression, staging)
        report(STEPS[9])
        image = GuestImage(
            kernel=root / key / KERNEL_NAME,
            initrd=root / key / INITRD_NAME,
            key=key,
            kernel_version=kernel_version,
            flavour=inputs.flavour,
            compression=inputs.compression,
            guest_code_hash=inputs.guest_code_hash,
            missing_modules=tuple(missing),
            dropped_extensions=tuple(dropped),
            built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        manifest = {"image": image.to_record(), "inputs": asdict(inputs)}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _replace_dir(out, root / key)
        return image
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` by rename; an existing ``target`` (a forced rebuild) is swapped out."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def _read_manifest(target: Path) -> GuestImage | None:
    try:
        image = GuestImage.from_record(json.loads((target / MANIFEST).read_text())["image"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if image.kernel.is_file() and image.initrd.is_file() else None


def _remove_abandoned(root: Path) -> None:
    """Remove what a killed build left (its temporary directories); the lock says none is running."""
    debs = cache_dir() / "debs"
    leftovers = [*root.glob(".build-*"), *root.glob(".old-*")]
    if debs.is_dir():
        leftovers += debs.glob(".partial-*")
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)


def _set_current(root: Path, image: GuestImage) -> None:
    tmp = root / f".{CURRENT_RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(image.to_record(), indent=2, sort_keys=True) + "\n")
    tmp.replace(root / CURRENT_RECORD)


def _prune(root: Path, keep: set[str], deb_prefixes: list[str]) -> None:
    """Drop older images and unused packages so the cache does not grow with every change.

    The image that was current until now stays: a VM being started from it must still find
    its files.
    """
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
    deb_dir = cache_dir() / "debs"
    for deb in deb_dir.glob("*.deb"):
        if not deb.name.startswith(tuple(deb_prefixes)):
            deb.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _build_lock(root: Path):  # type: ignore[no-untyped-def]
    """One build at a time per cache; a second one waits (bounded), then finds the result cached."""
    with (root / ".lock").open("w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageError(
                        f"another image build held {root / '.lock'} for {LOCK_TIMEOUT:.0f} s"
                    ) from None
                await asyncio.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
