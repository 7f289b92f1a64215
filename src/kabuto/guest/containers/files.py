"""File copy in and out: a guest path, or one in a container's root that no symlink can leave."""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from kabuto.guest.containers import syscalls as sc
from kabuto.ttrpc import Code, RpcError


class Root(NamedTuple):
    """Where a copied path resolves, and the openat2 resolve flags that keep it there."""

    path: str
    resolve: int


GUEST_ROOT = Root("/", 0)


def container_root(init_pid: int) -> Root:
    """A container's root, seen through its init's /proc entry."""
    return Root(f"/proc/{init_pid}/root", sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)


def open_file(root: Root, path: str, flags: int, mode: int = 0, *, make_parents: bool = False) -> int:
    """Open ``path`` (absolute, checked by the caller) under ``root``."""
    root_fd = os.open(root.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        relative = path.lstrip("/") or "."
        if make_parents:
            _make_parents(root_fd, relative, root.resolve)
        return sc.openat2(root_fd, relative, flags | os.O_CLOEXEC, mode, root.resolve)
    finally:
        os.close(root_fd)


def copy_in(root: Root, path: str, data: bytes, offset: int, mode: int) -> None:
    """Write ``data`` at ``offset`` of a regular file; offset 0 truncates it and applies ``mode``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | (os.O_TRUNC if offset == 0 else 0)
    try:
        fd = open_file(root, path, flags, mode or 0o644, make_parents=True)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RpcError(Code.INVALID_ARGUMENT, f"{path} is not a regular file")
            if offset == 0 and mode:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
    except OSError as exc:
        raise RpcError(_errno_code(exc), f"cannot write {path}: {exc.strerror or exc}") from None


def copy_out(root: Root, path: str, offset: int, max_len: int) -> tuple[bytes, os.stat_result]:
    """Up to ``max_len`` bytes at ``offset`` of a regular file, and the file's status."""
    try:
        fd = open_file(root, path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RpcError(Code.INVALID_ARGUMENT, f"{path} is not a regular file")
            data = os.pread(fd, max_len, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise RpcError(_errno_code(exc), f"cannot read {path}: {exc.strerror or exc}") from None
    return data, info


def _make_parents(root: int, relative: str, resolve: int) -> None:
    """Create the missing directories (0755) of ``relative`` under ``root``, as Kata's CopyFile."""
    parts = [part for part in relative.split("/")[:-1] if part]
    directory_flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    for index in range(len(parts)):
        try:
            os.close(sc.openat2(root, "/".join(parts[: index + 1]), directory_flags, 0, resolve))
            continue
        except FileNotFoundError:
            pass
        parent = sc.openat2(root, "/".join(parts[:index]) or ".", directory_flags, 0, resolve)
        try:
            os.mkdir(parts[index], 0o755, dir_fd=parent)
        except FileExistsError:
            pass
        finally:
            os.close(parent)


def _errno_code(exc: OSError) -> Code:
    if exc.errno == errno.ENOENT:
        return Code.NOT_FOUND
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Code.PERMISSION_DENIED
    return Code.INVALID_ARGUMENT
