"""Just enough ELF reading for the image builder: shared-library needs and module info.

Only 64-bit little-endian files occur here (x86_64 Debian packages), so only that layout
is read; anything else is reported as not ELF rather than guessed at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
SHT_DYNAMIC = 6
DT_NULL = 0
DT_NEEDED = 1


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError:
        return False
    return head[:4] == ELF_MAGIC and head[4] == ELFCLASS64 and head[5] == ELFDATA2LSB


def _sections(data: bytes) -> list[_Section]:
    if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for index in range(shnum):
        name, type_, _flags, _addr, offset, size, link = struct.unpack_from(
            "<IIQQQQI", data, shoff + index * shentsize
        )
        raw.append((name, type_, offset, size, link))
    names_offset = raw[shstrndx][2] if shnum else 0

    def name_at(offset: int) -> str:
        end = data.index(b"\0", names_offset + offset)
        return data[names_offset + offset:end].decode()

    return [_Section(name_at(n), t, o, s, link) for n, t, o, s, link in raw]


def needed_libraries(path: Path) -> list[str]:
    """The DT_NEEDED entries (sonames) of an executable or shared object."""
    data = path.read_bytes()
    sections = _sections(data)
    needed = []
    for section in sections:
        if section.type != SHT_DYNAMIC:
            continue
        strtab = sections[section.link]
        for pos in range(section.offset, section.offset + section.size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                start = strtab.offset + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def module_info(path: Path) -> dict[str, list[str]]:
    """A kernel module's .modinfo section: each key with all its values, in order."""
    data = path.read_bytes()
    info: dict[str, list[str]] = {}
    for section in _sections(data):
        if section.name != ".modinfo":
            continue
        for entry in data[section.offset:section.offset + section.size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_entry(data: bytes) -> bool:
    """Whether a kernel ELF carries the PVH entry note QEMU needs to boot it directly."""
    if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, size = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * phentsize
        )
        if p_type != PT_NOTE:
            continue
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
