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
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import kabuto
from kabuto.errors import ImageError
from kabuto.image import debian, elf, kernel, modules
from kabuto.image.cpio import DeviceNode, write_newc

DEFAULT_CACHE_DIR = Path("/var/cache/kabuto")
CACHE_ENV = "KABUTO_CACHE_DIR"
CURRENT_RECORD = "current.json"
MANIFEST = "manifest.json"
# The uncompressed ELF kernel, booted through its PVH entry: under TCG the guest spends about
# as long decompressing a bzImage as booting, so this halves boot time (docs/qemu.md).
KERNEL_NAME = "vmlinux"
XZ_MAGIC = b"\xfd7zXZ\x00"
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
PYTHON_VERSION = "3.11"

# Guest-side parts of Kabuto, relative to the kabuto package; nothing else is copied.
GUEST_CODE = ("__init__.py", "errors.py", "ttrpc", "protos", "guest")
GUEST_PYTHONPATH = "usr/lib/kabuto"
# The builder's own files that decide the image's bytes (the others only find or fetch things).
BUILDER_FILES = ("builder.py", "modules.py", "cpio.py", "elf.py", "init.sh", "kernel.py")

# Stdlib parts the agent never imports: dropping them keeps the initramfs small.
STDLIB_DROP = (
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "sqlite3", "dbm", "curses", "venv", "wsgiref", "xmlrpc", "unittest", "html", "http", "email",
    "xml", "__phello__", "tomllib", "zoneinfo", "msilib",
    "turtle.py", "pydoc.py", "doctest.py", "_pydecimal.py", "pdb.py", "mailbox.py", "imaplib.py",
    "smtplib.py", "nntplib.py", "ftplib.py", "poplib.py", "telnetlib.py", "tabnanny.py", "cgi.py",
    "cgitb.py", "webbrowser.py", "pickletools.py", "_pyio.py", "difflib.py", "EXTERNALLY-MANAGED",
    "LICENSE.txt",
)
# Extensions dropped although their libraries would be there; those whose library is in none of
# the packages (_ssl, _sqlite3, _lzma, readline ...) are dropped by _install_libraries.
LIB_DYNLOAD_DROP_PREFIXES = (
    "_test", "_xxtestfuzz", "xxlimited", "_ctypes_test", "_xxsubinterpreters", "ossaudiodev", "audioop",
    "_codecs_", "_multibytecodec", "_lsprof", "_zoneinfo",
)
# Codecs Python itself needs; the hundreds of legacy ones go.
ENCODINGS_KEEP = (
    "__init__.py", "aliases.py", "ascii.py", "latin_1.py", "utf_8.py", "utf_8_sig.py", "utf_16.py",
    "utf_16_le.py", "utf_16_be.py", "utf_32.py", "utf_32_le.py", "utf_32_be.py", "raw_unicode_escape.py",
    "unicode_escape.py", "idna.py", "punycode.py", "hex_codec.py", "base64_codec.py",
)
PROTOBUF_DROP = ("compiler", "testdata", "__pycache__")

COMPILE_TIMEOUT = 600.0
COMPRESS_TIMEOUT = 600.0
# another build holds the lock at most this long (a custom kernel build included)
LOCK_TIMEOUT = 1800.0 + kernel.MAKE_TIMEOUT
# What the image's probe mode (kabuto_probe=1) checks: the agent and protobuf import.
PROBE_CODE = "import sys, kabuto.guest.__main__, google.protobuf; print('python', sys.version.split()[0])"

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


def package_dir() -> Path:
    return Path(kabuto.__file__).parent


def guest_code_hash() -> str:
    return hash_files(package_dir(), GUEST_CODE, (".py",))


def builder_hash() -> str:
    return hash_files(Path(__file__).parent, BUILDER_FILES, (".py", ".sh"))


def protobuf_dir() -> tuple[Path, str]:
    import google.protobuf

    return Path(google.protobuf.__file__).parent, google.protobuf.__version__


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


# --- assembling the root filesystem ------------------------------------------------------------


def _install_kernel(debroot: Path, rootfs: Path, kernel_out: Path) -> tuple[str, list[str]]:
    vmlinuz = sorted((debroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageError(f"expected one kernel in the kernel package, found {[p.name for p in vmlinuz]}")
    version = vmlinuz[0].name.removeprefix("vmlinuz-")
    kernel_out.write_bytes(extract_vmlinux(vmlinuz[0].read_bytes()))
    kernel_dir = debroot / "lib" / "modules" / version
    available = modules.index_modules(kernel_dir).keys() | modules.builtin_modules(kernel_dir)
    missing = [m for m in modules.OPTIONAL_MODULES if m not in available]
    wanted = [m for m in (*modules.BOOT_MODULES, *modules.ON_DEMAND_MODULES) if m not in missing]
    boot = [m for m in modules.BOOT_MODULES if m not in missing]
    guest_dir = rootfs / "lib" / "modules" / version
    modules.copy_modules(modules.load_order(tuple(wanted), kernel_dir), kernel_dir, guest_dir)
    boot_order = modules.load_order(tuple(boot), kernel_dir)
    (rootfs / "lib" / "modules" / "boot-modules").write_text(
        "".join(f"/lib/modules/{version}/{ko.relative_to(kernel_dir)}\n" for ko in boot_order)
    )
    # what probe mode checks modprobe can load, as the kernel will ask for it
    shipped = modules.index_modules(guest_dir)
    (rootfs / "lib" / "modules" / "demand-aliases").write_text(
        "".join(f"{alias}\n" for name, alias in modules.ON_DEMAND_ALIASES.items() if name in shipped)
    )
    return version, missing


def _install_custom_kernel(
    built: kernel.CustomKernel, rootfs: Path, kernel_out: Path
) -> tuple[str, list[str]]:
    """The custom kernel has every driver built in: /init's module lists stay empty."""
    shutil.copy2(built.vmlinux, kernel_out)
    module_dir = rootfs / "lib" / "modules"
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / "boot-modules").write_text("")
    (module_dir / "demand-aliases").write_text("")
    return built.release, []


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (Debian compresses it with xz), checked for a PVH entry."""
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise ImageError("the kernel package's bzImage holds no xz stream to extract vmlinux from")
    try:
        vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError as exc:
        raise ImageError(f"cannot decompress the kernel inside the bzImage: {exc}") from exc
    if not elf.has_pvh_entry(vmlinux):
        raise ImageError("the extracted vmlinux has no PVH entry note, so QEMU cannot boot it directly")
    return vmlinux


def _install_userland(debroot: Path, rootfs: Path) -> None:
    for name in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "etc", "sbin", "usr/sbin"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "hostname").write_text("kabuto\n")
    _install_busybox(debroot, rootfs)
    _install_python(debroot, rootfs)
    # modules.dep and modules.alias for the guest's modprobe, written by the guest's own busybox
    for kernel_dir in (rootfs / "lib" / "modules").iterdir():
        if kernel_dir.is_dir():
            subprocess.run([str(rootfs / "bin" / "busybox"), "depmod", "-b", str(rootfs), kernel_dir.name],
                           capture_output=True, timeout=60, check=True)


def _install_busybox(debroot: Path, rootfs: Path) -> None:
    busybox = rootfs / "bin" / "busybox"
    busybox.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(debroot / "bin" / "busybox", busybox)
    # Debian's busybox-static is a static binary, so it runs on the build host to list its applets.
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, timeout=30,
                             check=True)
    for applet in listing.stdout.split():
        link = rootfs / applet
        if link.name == "busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(busybox, link.parent))


def _install_python(debroot: Path, rootfs: Path) -> None:
    interpreter = rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"
    interpreter.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(debroot / "usr" / "bin" / interpreter.name, interpreter)
    (interpreter.parent / "python3").symlink_to(interpreter.name)

    stdlib_src = debroot / "usr" / "lib" / f"python{PYTHON_VERSION}"
    stdlib = rootfs / "usr" / "lib" / f"python{PYTHON_VERSION}"
    shutil.copytree(stdlib_src, stdlib, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "config-*", "*-packages"))
    for name in STDLIB_DROP:
        victim = stdlib / name
        if victim.is_dir():
            shutil.rmtree(victim)
        else:
            victim.unlink(missing_ok=True)
    for codec in (stdlib / "encodings").iterdir():
        if codec.name not in ENCODINGS_KEEP:
            codec.unlink()
    for extension in (stdlib / "lib-dynload").iterdir():
        if extension.name.startswith(LIB_DYNLOAD_DROP_PREFIXES):
            extension.unlink()


def _install_libraries(debroot: Path, rootfs: Path) -> list[str]:
    """Copy in the shared libraries every binary needs; returns the extension modules dropped.

    An optional stdlib extension whose library is in none of the packages (_ssl, _sqlite3 ...)
    is dropped, so its import fails cleanly; any other unmet need fails the build.
    """
    lib_dirs = [debroot / "lib" / "x86_64-linux-gnu", debroot / "usr" / "lib" / "x86_64-linux-gnu"]
    dynload = rootfs / "usr" / "lib" / f"python{PYTHON_VERSION}" / "lib-dynload"
    files = (p for p in (rootfs / "usr").rglob("*") if not p.is_symlink() and p.is_file())
    binaries = [p for p in files if elf.is_elf(p)]
    libraries: dict[str, Path] = {}
    dropped = []
    for binary in binaries:
        try:
            libraries |= _library_closure(binary, lib_dirs)
        except ImageError:
            if binary.parent != dynload:
                raise
            binary.unlink()
            dropped.append(binary.name.split(".")[0])
    target_dir = rootfs / "lib" / "x86_64-linux-gnu"
    target_dir.mkdir(parents=True, exist_ok=True)
    for soname, path in libraries.items():
        shutil.copy2(path, target_dir / soname)
    loader = debroot / "lib64" / "ld-linux-x86-64.so.2"
    (rootfs / "lib64").mkdir(exist_ok=True)
    shutil.copy2(loader, rootfs / "lib64" / loader.name)
    return sorted(dropped)


def _library_closure(binary: Path, lib_dirs: list[Path]) -> dict[str, Path]:
    """Soname -> file for every shared library ``binary`` needs, transitively."""
    found: dict[str, Path] = {}
    pending = [(lib, binary.name) for lib in elf.needed_libraries(binary)]
    while pending:
        soname, needer = pending.pop()
        if soname in found:
            continue
        path = next((d / soname for d in lib_dirs if (d / soname).exists()), None)
        if path is None:
            raise ImageError(f"shared library {soname} (needed by {needer}) is in no guest package")
        found[soname] = path.resolve()
        pending.extend((lib, soname) for lib in elf.needed_libraries(found[soname]))
    return found


def _install_guest_code(rootfs: Path) -> None:
    site = rootfs / GUEST_PYTHONPATH
    source = package_dir()
    for entry in GUEST_CODE:
        src = source / entry
        dest = site / "kabuto" / entry
        if src.is_dir():
            shutil.copytree(src, dest,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi", "*.proto"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    protobuf, _ = protobuf_dir()
    shutil.copytree(protobuf, site / "google" / "protobuf",
                    ignore=shutil.ignore_patterns(*PROTOBUF_DROP, "*.pyc", "*.pyi", "*_test.py"))
    upb = protobuf.parent / "_upb"
    if upb.is_dir():
        shutil.copytree(upb, site / "google" / "_upb", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _python_env(rootfs: Path) -> dict[str, str]:
    """Environment the guest's Python needs: protobuf's pure-Python code where upb is absent."""
    if (rootfs / GUEST_PYTHONPATH / "google" / "_upb").is_dir():
        return {}
    return {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}


def _write_init(rootfs: Path) -> None:
    template = (Path(__file__).parent / "init.sh").read_text()
    exports = "".join(f"export {name}={value}\n" for name, value in _python_env(rootfs).items())
    text = template.replace("@PYTHON_ENV@", exports)
    text = text.replace("@PROBE@", PROBE_CODE)
    init = rootfs / "init"
    init.write_text(text)
    init.chmod(0o755)


# Imports every guest module with the guest's interpreter: a stdlib part the agent needs but the
# image dropped fails the build here rather than the VM's boot.
IMPORT_CHECK = """
import importlib, pkgutil, sys
import kabuto
for info in pkgutil.walk_packages(kabuto.__path__, "kabuto."):
    if not info.name.endswith(".generate"):
        importlib.import_module(info.name)
"""


def _guest_python(rootfs: Path, *args: str) -> list[str]:
    """A command running the guest's interpreter on the build host, with the guest's own libraries."""
    return [str(rootfs / "lib64" / "ld-linux-x86-64.so.2"),
            "--library-path", str(rootfs / "lib" / "x86_64-linux-gnu"),
            str(rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"), "-S", *args]


def _guest_env(rootfs: Path) -> dict[str, str]:
    return {"PYTHONHOME": str(rootfs / "usr"), "PYTHONPATH": str(rootfs / GUEST_PYTHONPATH),
            "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8", **_python_env(rootfs)}


async def _check_imports(rootfs: Path) -> None:
    try:
        await debian.run(_guest_python(rootfs, "-c", IMPORT_CHECK), COMPILE_TIMEOUT, env=_guest_env(rootfs))
    except ImageError as exc:
        raise ImageError(f"the guest code does not import with the image's Python: {exc}") from None


async def _compile_python(rootfs: Path) -> None:
    """Precompile every kept module with the guest's own interpreter, so the agent starts fast.

    unchecked-hash .pyc files are used without looking at the source's mtime, which the
    initramfs does not keep.
    """
    stdlib = rootfs / "usr" / "lib" / f"python{PYTHON_VERSION}"
    await debian.run(
        _guest_python(rootfs, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
                      "-s", str(rootfs), "-p", "/", "-x", r"lib2to3|/test/|bad_coding|badsyntax",
                      str(stdlib), str(rootfs / GUEST_PYTHONPATH)),
        COMPILE_TIMEOUT, env=_guest_env(rootfs),
    )


def _drop_sources(rootfs: Path) -> None:
    """Keep only bytecode for the stdlib and protobuf (a third of the initramfs otherwise).

    A module.pyc beside where module.py was is imported without its source; Kabuto's own
    code keeps its sources so that the agent's tracebacks show the lines.
    """
    for tree in (rootfs / "usr" / "lib" / f"python{PYTHON_VERSION}", rootfs / GUEST_PYTHONPATH / "google"):
        for cached in list(tree.rglob(f"__pycache__/*.cpython-{PYTHON_VERSION.replace('.', '')}.pyc")):
            source = cached.parent.parent / (cached.name.split(".")[0] + ".py")
            if source.is_file():
                cached.replace(source.with_suffix(".pyc"))
                source.unlink()
        for cache in list(tree.rglob("__pycache__")):
            if not any(cache.iterdir()):
                cache.rmdir()


async def _write_initramfs(rootfs: Path, dest: Path, compression: str, scratch: Path) -> None:
    devices = (DeviceNode("dev/console", 5, 1), DeviceNode("dev/null", 1, 3, 0o666))
    if compression == "gzip":
        def write_gzip() -> None:
            with dest.open("wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as out:
                write_newc(rootfs, out, devices)  # type: ignore[arg-type]
        await asyncio.to_thread(write_gzip)
        return
    plain = dest if compression == "none" else scratch / "initrd.cpio"

    def write_plain() -> None:
        with plain.open("wb") as out:
            write_newc(rootfs, out, devices)
    await asyncio.to_thread(write_plain)
    compressors = {"zstd": ["zstd", "-q", "-19", "-T0", "-f", "-o", str(dest), str(plain)],
                   # the kernel reads only lz4's legacy frame format (-l)
                   "lz4": ["lz4", "-q", "-l", "-9", "-f", str(plain), str(dest)]}
    if compression in compressors:
        command = compressors[compression]
        if shutil.which(command[0]) is None:
            raise ImageError(f"{compression} compression needs the {command[0]} command "
                             f"(apt-get install {command[0]})")
        await debian.run(command, COMPRESS_TIMEOUT)
