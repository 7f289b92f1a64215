"""Assemble the guest's root filesystem and write it out as the initramfs.

builder.py runs these steps in order on a ``rootfs`` directory beside the unpacked packages
(``debroot``): the kernel and its modules, busybox, a trimmed Python and the shared libraries
it needs, Kabuto's guest code and protobuf, their bytecode, then the cpio archive.
"""

from __future__ import annotations

import asyncio
import gzip
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import kabuto
from kabuto.errors import ImageError
from kabuto.image import debian, elf, kernel, modules
from kabuto.image.cpio import DeviceNode, write_newc

XZ_MAGIC = b"\xfd7zXZ\x00"
PYTHON_VERSION = "3.11"

# Guest-side parts of Kabuto, relative to the kabuto package; nothing else is copied.
GUEST_CODE = ("__init__.py", "errors.py", "ttrpc", "protos", "guest")
GUEST_PYTHONPATH = "usr/lib/kabuto"

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
# What the image's probe mode (kabuto_probe=1) checks: the agent and protobuf import.
PROBE_CODE = "import sys, kabuto.guest.__main__, google.protobuf; print('python', sys.version.split()[0])"


def package_dir() -> Path:
    return Path(kabuto.__file__).parent


def protobuf_dir() -> tuple[Path, str]:
    import google.protobuf

    return Path(google.protobuf.__file__).parent, google.protobuf.__version__


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
