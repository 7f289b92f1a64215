"""The builder boots the ELF kernel from inside Debian's bzImage through its PVH entry."""

from __future__ import annotations

import lzma
import struct

import pytest

from kabuto.errors import ImageError
from kabuto.image.elf import XEN_ELFNOTE_PHYS32_ENTRY, has_pvh_entry
from kabuto.image.rootfs import extract_vmlinux


def _elf_with_note(name: bytes, note_type: int) -> bytes:
    """A minimal 64-bit little-endian ELF: header, one PT_NOTE program header, the note."""
    note = struct.pack("<III", len(name) + 1, 4, note_type) + name + b"\0" * (4 - len(name) % 4) + b"\x00" * 4
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note


def test_pvh_note_is_found_and_other_notes_are_not_taken_for_it() -> None:
    assert has_pvh_entry(_elf_with_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY))
    assert not has_pvh_entry(_elf_with_note(b"Xen", 5))
    assert not has_pvh_entry(_elf_with_note(b"GNU", XEN_ELFNOTE_PHYS32_ENTRY))
    assert not has_pvh_entry(b"MZ not an elf at all")


def test_vmlinux_comes_out_of_the_xz_stream_in_a_bzimage() -> None:
    vmlinux = _elf_with_note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    bzimage = b"\x00" * 512 + b"setup code" + lzma.compress(vmlinux, format=lzma.FORMAT_XZ) + b"trailer"
    assert extract_vmlinux(bzimage) == vmlinux


@pytest.mark.parametrize(
    ("bzimage", "reason"),
    [
        (b"\x00" * 1024, "no xz stream"),
        (b"\xfd7zXZ\x00" + b"garbage" * 10, "cannot decompress"),
        (lzma.compress(_elf_with_note(b"Xen", 5), format=lzma.FORMAT_XZ), "no PVH entry"),
    ],
)
def test_a_kernel_that_cannot_boot_directly_is_refused(bzimage: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        extract_vmlinux(bzimage)
