"""The image builder's pieces: ELF reading, module ordering, the cpio writer."""

from __future__ import annotations

import io
import stat
import struct
from pathlib import Path

import pytest

from kabuto.errors import ImageError
from kabuto.image import elf, modules, rootfs
from kabuto.image.cpio import DeviceNode, write_newc


def make_ko(path: Path, **info: str) -> Path:
    """A minimal 64-bit ELF file whose .modinfo holds ``info`` (what a kernel module carries)."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_offset = 64
    shoff = data_offset + len(modinfo) + len(shstrtab)
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def section(name: int, type_: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, type_, 0, 0, offset, size, 0, 0, 1, 0)

    sections = section(0, 0, 0, 0)
    sections += section(1, 1, data_offset, len(modinfo))
    sections += section(10, 3, data_offset + len(modinfo), len(shstrtab))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + modinfo + shstrtab + sections)
    return path


def test_module_info_reads_every_key(tmp_path: Path) -> None:
    ko = make_ko(tmp_path / "a.ko", name="a", depends="b,c", alias="fs-a")
    assert elf.module_info(ko) == {"name": ["a"], "depends": ["b,c"], "alias": ["fs-a"]}


def test_needed_libraries_of_a_host_binary() -> None:
    ls = Path("/bin/ls").resolve()
    if not elf.is_elf(ls):
        pytest.skip(f"{ls} is not a 64-bit ELF binary on this host")
    assert "libc.so.6" in elf.needed_libraries(ls)


def test_not_elf_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    assert not elf.is_elf(text)
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf.needed_libraries(text)


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path: Path) -> None:
    kernel = tmp_path / "lib/modules/6.1.0-test"
    make_ko(kernel / "kernel/fs/9p/9p.ko", name="9p", depends="9pnet,netfs")
    make_ko(kernel / "kernel/net/9p/9pnet.ko", name="9pnet", depends="")
    make_ko(kernel / "kernel/fs/netfs/netfs.ko", name="netfs", depends="fscache")
    make_ko(kernel / "kernel/net/9p/9pnet_virtio.ko", name="9pnet_virtio", depends="9pnet,virtio-ring")
    make_ko(kernel / "kernel/drivers/virtio/virtio_ring.ko", name="virtio_ring", depends="")
    (kernel / "modules.builtin").write_text("kernel/fs/fscache/fscache.ko\n")

    order = [ko.name for ko in modules.load_order(("9pnet_virtio", "9p"), kernel)]

    assert order == ["9pnet.ko", "virtio_ring.ko", "9pnet_virtio.ko", "netfs.ko", "9p.ko"]


def test_load_order_names_a_missing_module(tmp_path: Path) -> None:
    kernel = tmp_path / "lib/modules/6.1.0-test"
    make_ko(kernel / "kernel/fs/9p/9p.ko", name="9p", depends="9pnet")
    with pytest.raises(ImageError, match="'9pnet' \\(needed by 9p\\)"):
        modules.load_order(("9p",), kernel)


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdev major, minor)) for every entry but the trailer."""
    entries = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev = fields[1], fields[6], (fields[9], fields[10])
        name_size = fields[11]
        name = data[pos + 110:pos + 110 + name_size - 1].decode()
        pos += 110 + name_size
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, rdev)


def test_newc_archive_holds_files_dirs_links_and_devices(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF-ish")
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("busybox")
    (root / "init").write_text("#!/bin/sh\n")
    out = io.BytesIO()

    write_newc(root, out, (DeviceNode("dev/console", 5, 1),))

    data = out.getvalue()
    assert len(data) % 4 == 0
    entries = read_newc(data)
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "init", "dev/console"]
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF-ish", (0, 0))
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)


def test_newc_archive_is_reproducible(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a/file").write_text("same")
    first, second = io.BytesIO(), io.BytesIO()
    write_newc(root, first)
    (root / "a/file").touch()  # a new mtime must not change the archive
    write_newc(root, second)
    assert first.getvalue() == second.getvalue()


def test_library_closure_follows_needs_and_names_a_missing_library(tmp_path: Path) -> None:
    ls = Path("/bin/ls").resolve()
    host_libs = Path("/lib/x86_64-linux-gnu")
    if not (elf.is_elf(ls) and host_libs.is_dir()):
        pytest.skip("needs a Debian x86_64 host's /bin/ls and /lib/x86_64-linux-gnu")
    found = rootfs._library_closure(ls, [host_libs])
    assert "libc.so.6" in found and found["libc.so.6"].is_file()
    with pytest.raises(ImageError, match=r"libc\.so\.6|needed by ls"):
        rootfs._library_closure(ls, [tmp_path])


def test_drop_sources_keeps_bytecode_beside_where_the_source_was(tmp_path: Path) -> None:
    stdlib = tmp_path / "usr/lib/python3.11"
    (stdlib / "json/__pycache__").mkdir(parents=True)
    (stdlib / "json/decoder.py").write_text("source")
    (stdlib / "json/__pycache__/decoder.cpython-311.pyc").write_bytes(b"bytecode")
    guest = tmp_path / rootfs.GUEST_PYTHONPATH / "kabuto/__pycache__"
    guest.mkdir(parents=True)
    (guest.parent / "errors.py").write_text("source")
    (guest / "errors.cpython-311.pyc").write_bytes(b"bytecode")

    rootfs._drop_sources(tmp_path)

    assert sorted(p.name for p in (stdlib / "json").iterdir()) == ["decoder.pyc"]
    assert (stdlib / "json/decoder.pyc").read_bytes() == b"bytecode"
    assert (guest.parent / "errors.py").is_file() and (guest / "errors.cpython-311.pyc").is_file()
