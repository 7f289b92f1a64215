"""The Linux calls Python 3.11's os module lacks, through ctypes on libc.

Failures raise OSError with errno and the call's arguments, so messages name what failed.
"""

from __future__ import annotations

import ctypes
import os
import struct

# By soname: ctypes.util.find_library would spawn ldconfig, which the guest may lack.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# sys/mount.h
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

# prctl
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# asm-generic/ioctls.h (x86-64 and aarch64 alike): the pty ioctls termios lacks
TIOCGPTN = 0x80045430  # the pty's number N, its slave /dev/pts/N
TIOCSPTLCK = 0x40045431  # lock (1) or unlock (0) the slave
TIOCGPTPEER = 0x5441  # open the slave through the master, whatever /dev/pts holds

# x86-64 and aarch64 syscall numbers (the guest runs one of these).
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "openat2": 437},
    "aarch64": {"pivot_root": 41, "capset": 91, "openat2": 437},
}
_NR = _SYSCALLS.get(os.uname().machine, _SYSCALLS["x86_64"])

# openat2 resolve flags
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(result: int, what: str) -> int:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _path(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    result = _libc.mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags), _path(data))
    _check(result, f"mount {source or 'none'} on {target} (type {fstype or 'none'}, flags {flags:#x})")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_path(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(ctypes.c_long(_NR["pivot_root"]), _path(new_root), _path(put_old))
    _check(result, f"pivot_root({new_root}, {put_old})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname({name!r})")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    result = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0)
    _check(result, f"prctl({option}, {arg2}, {arg3})")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (64-bit masks, version 3 ABI)."""
    header = struct.pack("II", _LINUX_CAPABILITY_VERSION_3, 0)
    data = struct.pack(
        "IIIIII",
        effective & 0xFFFFFFFF,
        permitted & 0xFFFFFFFF,
        inheritable & 0xFFFFFFFF,
        effective >> 32,
        permitted >> 32,
        inheritable >> 32,
    )
    result = _libc.syscall(ctypes.c_long(_NR["capset"]), header, data)
    _check(result, "capset")


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` under the ``resolve`` restrictions."""
    how = struct.pack("QQQ", flags, mode, resolve)
    result = _libc.syscall(
        ctypes.c_long(_NR["openat2"]), ctypes.c_int(dirfd), _path(path), how, ctypes.c_size_t(len(how))
    )
    return _check(result, f"open {path}")
