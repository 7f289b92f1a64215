"""The content-addressed cache of built guest images, under /var/cache/kabuto (or $KABUTO_CACHE_DIR).

An image lives in ``<cache>/image/<key>/`` where the key hashes every input (package
versions, the builder's code, the guest code, the protobuf version, the options), so a
changed input gives a new directory and an unchanged one is reused. A build happens in a
temporary directory beside it and is renamed into place only when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kabuto.errors import ImageError
from kabuto.image import debian, kernel
from kabuto.image.rootfs import GUEST_CODE, package_dir

DEFAULT_CACHE_DIR = Path("/var/cache/kabuto")
CACHE_ENV = "KABUTO_CACHE_DIR"
CURRENT_RECORD = "current.json"
MANIFEST = "manifest.json"
# The builder's own files that decide the image's bytes (the others only find or fetch things).
BUILDER_FILES = ("builder.py", "cache.py", "rootfs.py", "modules.py", "cpio.py", "elf.py", "init.sh",
                 "kernel.py")
# another build holds the lock at most this long (a custom kernel build included)
LOCK_TIMEOUT = 1800.0 + kernel.MAKE_TIMEOUT


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
