"""Build the guest image: a Debian kernel and an initramfs holding busybox, Python and the agent.

The inputs are resolved and hashed into a key; the cache (cache.py) returns the image it holds
for that key, else one is assembled (rootfs.py) in a temporary directory and installed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from kabuto.errors import ImageError
from kabuto.image import debian, kernel
from kabuto.image.cache import (
    MANIFEST,
    BuildInputs,
    GuestImage,
    _build_lock,
    _prune,
    _read_manifest,
    _remove_abandoned,
    _replace_dir,
    _set_current,
    builder_hash,
    cache_dir,
    guest_code_hash,
    image_root,
    installed_image,
)
from kabuto.image.rootfs import (
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
    protobuf_dir,
)

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
            built = await kernel.build_kernel(source, cache_dir(), kernel.fragment_options(),
                                              heartbeat=lambda detail: report(f"{STEPS[3]}: {detail}"))
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
