"""The custom guest kernel: its config fragment, cache key, cache and the builder's custom flavour.

No kernel is compiled here: the compile step is replaced by a stand-in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest

from kabuto.errors import ImageError
from kabuto.image import builder, cache, debian, kernel
from kabuto.image.builder import build_image
from kabuto.image.rootfs import _install_custom_kernel

SOURCE = debian.Package("linux-source-6.1", "6.1.192-2")
OPTIONS = {"CONFIG_PVH": "y", "CONFIG_MODULES": "n"}


def test_fragment_lines_comments_and_not_set() -> None:
    text = (
        "# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"text\"\n"
        "CONFIG_D=y\nCONFIG_D=n\n"
    )
    assert kernel.parse_config(text) == {
        "CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"text"', "CONFIG_D": "n"
    }


def test_a_malformed_fragment_line_is_named() -> None:
    with pytest.raises(ImageError, match=r"frag line 2: 'VIRTIO=y'"):
        kernel.parse_config("CONFIG_A=y\nVIRTIO=y\n", "frag")


def test_the_checked_in_fragment_builds_in_what_the_guest_needs() -> None:
    options = kernel.fragment_options()
    needed = (
        "PVH", "VIRTIO_PCI", "VIRTIO_MMIO", "VIRTIO_CONSOLE", "VIRTIO_BLK", "VIRTIO_NET", "NET_9P_VIRTIO",
        "9P_FS", "EXT4_FS", "OVERLAY_FS", "TMPFS", "DEVTMPFS", "UTS_NS", "IPC_NS", "PID_NS", "NET_NS",
        "CGROUPS", "MEMCG", "CGROUP_PIDS", "CGROUP_SCHED", "VIRTIO_VSOCKETS", "HOTPLUG_PCI_PCIE",
        "HOTPLUG_PCI_ACPI", "SERIAL_8250_CONSOLE", "UNIX", "INET", "FUTEX", "EPOLL", "UNIX98_PTYS",
        "BINFMT_ELF", "BINFMT_SCRIPT", "MULTIUSER",
    )
    assert [name for name in needed if options.get(f"CONFIG_{name}") != "y"] == []
    assert options["CONFIG_MODULES"] == "n"


def test_key_follows_source_version_and_options_not_comments(tmp_path: Path) -> None:
    base = kernel.kernel_key(SOURCE, OPTIONS)
    assert kernel.kernel_key(SOURCE, dict(OPTIONS)) == base
    assert kernel.kernel_key(debian.Package(SOURCE.name, "6.1.193-1"), OPTIONS) != base
    assert kernel.kernel_key(SOURCE, {**OPTIONS, "CONFIG_IPV6": "y"}) != base
    fragment = tmp_path / "kernel.config"
    fragment.write_text("CONFIG_PVH=y\nCONFIG_MODULES=n\n")
    commented = tmp_path / "commented.config"
    commented.write_text("# why\nCONFIG_PVH=y\n\n# CONFIG_MODULES is not set\n")
    assert kernel.kernel_key(SOURCE, kernel.fragment_options(fragment)) == base
    assert kernel.kernel_key(SOURCE, kernel.fragment_options(commented)) == base


def test_unmet_options_are_those_olddefconfig_changed() -> None:
    wanted = {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_D": "n"}
    final = kernel.parse_config("CONFIG_A=y\nCONFIG_D=y\n# CONFIG_C is not set\n")
    assert kernel.unmet_options(wanted, final) == ["CONFIG_C=y (got n)", "CONFIG_D=n (got y)"]


class FakeCompile:
    """Stands in for unpacking and compiling: writes a vmlinux, or fails as told."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.fail = False
        monkeypatch.setattr(kernel, "_compile", self.compile)
        monkeypatch.setattr(kernel, "missing_build_tools", lambda: [])
        monkeypatch.setattr(debian, "download", self.download)

    async def download(self, packages: list[debian.Package], deb_dir: Path) -> list[Path]:
        return [deb_dir / f"{p.deb_prefix()}all.deb" for p in packages]

    async def compile(self, deb: Path, staging: Path, options: dict[str, str], jobs: int,
                      heartbeat: Any = None) -> str:
        self.calls += 1
        (staging / "out").mkdir()
        (staging / "out" / "vmlinux").write_bytes(b"\x7fELF")
        (staging / "out" / ".config").write_text("CONFIG_PVH=y\n")
        if self.fail:
            raise ImageError("make vmlinux failed on purpose")
        return "6.1.192"


@pytest.fixture
def fake_compile(monkeypatch: pytest.MonkeyPatch) -> FakeCompile:
    return FakeCompile(monkeypatch)


async def test_a_kernel_is_built_once_then_taken_from_the_cache(
    fake_compile: FakeCompile, tmp_path: Path
) -> None:
    built = await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    again = await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    assert fake_compile.calls == 1 and again == built
    assert built.release == "6.1.192" and built.vmlinux.read_bytes() == b"\x7fELF"
    assert built.vmlinux.parent == tmp_path / "kernel" / kernel.kernel_key(SOURCE, OPTIONS)


async def test_a_changed_fragment_builds_anew_and_drops_the_old_kernel(
    fake_compile: FakeCompile, tmp_path: Path
) -> None:
    old = await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    new = await kernel.build_kernel(SOURCE, tmp_path, {**OPTIONS, "CONFIG_IPV6": "y"})
    assert fake_compile.calls == 2 and new.key != old.key
    assert sorted(p.name for p in (tmp_path / "kernel").iterdir()) == [new.key]


async def test_a_failed_build_leaves_nothing(fake_compile: FakeCompile, tmp_path: Path) -> None:
    fake_compile.fail = True
    with pytest.raises(ImageError, match="failed on purpose"):
        await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    assert list((tmp_path / "kernel").iterdir()) == []
    assert kernel.cached_kernel(tmp_path, kernel.kernel_key(SOURCE, OPTIONS)) is None


async def test_a_killed_builds_leftovers_are_removed(fake_compile: FakeCompile, tmp_path: Path) -> None:
    leftover = tmp_path / "kernel" / ".build-abc-123"
    leftover.mkdir(parents=True)
    await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    assert not leftover.exists()


async def test_missing_build_tools_are_named_before_building(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    absent = ("flex", "bison")
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool in absent else f"/usr/bin/{tool}")
    with pytest.raises(ImageError, match=r"needs bison, flex"):
        await kernel.build_kernel(SOURCE, tmp_path, OPTIONS)
    assert list((tmp_path / "kernel").iterdir()) == []


async def test_a_timed_out_command_ends_its_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child"
    with pytest.raises(ImageError, match="did not finish within"):
        await kernel._run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1.0)
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


async def test_a_failed_command_reports_its_output() -> None:
    with pytest.raises(ImageError, match=r"exit 2\): no such target"):
        await kernel._run(["sh", "-c", "echo no such target >&2; exit 2"], timeout=10.0)


async def test_the_custom_flavour_boots_the_built_kernel_with_no_modules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The image builder takes the cached kernel and writes empty module lists for /init."""
    from tests.unit.test_image_cache import BASE, FakeBuild

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    fake = FakeBuild(monkeypatch)
    fake.inputs = dataclasses.replace(BASE, flavour="custom", packages=(SOURCE, *BASE.packages[1:]),
                                      extra={"kernel": kernel.kernel_key(SOURCE, OPTIONS)})
    compiled = FakeCompile(monkeypatch)
    downloaded: list[str] = []

    async def download(packages: list[debian.Package], deb_dir: Path) -> list[Path]:
        downloaded.extend(p.name for p in packages)
        return await compiled.download(packages, deb_dir)

    monkeypatch.setattr(debian, "download", download)
    unpacked_for_root: list[str] = []

    async def extract(deb: Path, dest: Path) -> None:
        unpacked_for_root.append(deb.name)
        os.makedirs(dest, exist_ok=True)

    monkeypatch.setattr(debian, "extract", extract)
    seen: list[str] = []
    image = await build_image(flavour="custom", progress=seen.append)
    assert compiled.calls == 1 and fake.builds == 0  # no Debian kernel was installed
    assert image.kernel.read_bytes() == b"\x7fELF" and image.kernel_version == "6.1.192"
    assert image.missing_modules == () and image.flavour == "custom"
    assert seen == list(builder.STEPS)
    # the source package is fetched for the kernel, never unpacked into the guest's root
    assert "linux-source-6.1" in downloaded
    assert not any(name.startswith("linux-source") for name in unpacked_for_root)


def test_the_custom_kernel_leaves_init_no_modules_to_load(tmp_path: Path) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF")
    rootfs = tmp_path / "rootfs"
    release, missing = _install_custom_kernel(kernel.CustomKernel(vmlinux, "6.1.192", "k"), rootfs,
                                              tmp_path / "out")
    assert (release, missing) == ("6.1.192", [])
    assert (tmp_path / "out").read_bytes() == b"\x7fELF"
    assert (rootfs / "lib/modules/boot-modules").read_text() == ""
    assert (rootfs / "lib/modules/demand-aliases").read_text() == ""


async def test_a_long_compile_reports_how_far_it_got(tmp_path: Path, monkeypatch) -> None:
    """make -s is silent for minutes; the heartbeat counts the objects built so far."""
    monkeypatch.setattr(kernel, "HEARTBEAT_INTERVAL", 0.01)
    for name in ("a.o", "sub/b.o", "c.c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    heard: list[str] = []
    first = asyncio.Event()

    def hear(line: str) -> None:
        heard.append(line)
        first.set()

    ticker = asyncio.create_task(kernel._count_objects(tmp_path, hear))
    async with asyncio.timeout(10):
        await first.wait()
    ticker.cancel()
    assert heard[0].startswith("2 objects compiled in ")


async def test_each_silent_phase_of_the_kernel_build_is_announced(tmp_path: Path, monkeypatch) -> None:
    """Unpacking the source and configuring it print nothing for minutes, as make -s does: the
    heartbeat hears each phase begin, in order, before the compile's object counts."""
    commands: list[list[str]] = []

    async def extract(deb: Path, dest: Path) -> None:
        (dest / "usr/src").mkdir(parents=True)
        (dest / "usr/src/linux-source-6.1.tar.xz").write_bytes(b"")

    async def run(args: list[str], timeout: float) -> str:
        commands.append(args)
        if args[0] == "tar":
            (tmp_path / "linux-source-6.1").mkdir()
        elif args[-1] == "tinyconfig":
            (tmp_path / "out").mkdir()
            (tmp_path / "out/.config").write_text("")
        elif args[-1] == "vmlinux":
            (tmp_path / "out/vmlinux").write_bytes(b"\x7fELF")
        return "6.1.192\n"

    monkeypatch.setattr(debian, "extract", extract)
    monkeypatch.setattr(kernel, "_run", run)
    monkeypatch.setattr(kernel.elf, "has_pvh_entry", lambda data: True)
    heard: list[str] = []
    release = await kernel._compile(tmp_path / "linux-source-6.1_all.deb", tmp_path, {}, 2,
                                    heartbeat=heard.append)
    assert release == "6.1.192"
    assert heard == ["unpacking linux-source-6.1_all.deb", "configuring linux-source-6.1",
                     "compiling with 2 jobs"]
    assert [args[-1] for args in commands] == [str(tmp_path), "tinyconfig", "olddefconfig", "vmlinux",
                                               "kernelrelease"]
