"""Opening a network namespace by path, checked, for pyroute2.

pyroute2 enters a netns by forking a child that calls setns(2); given a path, it creates the
namespace when it is missing (its default ``flags=O_CREAT``). Kabuto never creates one: the
path is opened and checked here, and pyroute2 gets the open descriptor, so a namespace that
CNI deletes meanwhile cannot be brought back under the same name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from pyroute2 import IPRoute

from kabuto.runtime.network.model import NetnsGone, NetworkError

# linux/nsfs.h: NS_GET_NSTYPE = _IO(0xb7, 0x3); linux/sched.h: CLONE_NEWNET
NS_GET_NSTYPE = 0xB703
CLONE_NEWNET = 0x40000000


def open_netns(path: str) -> int:
    """A read-only descriptor on the network namespace at ``path``; NetnsGone if it is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsGone(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetworkError(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        # ENOTTY: not an nsfs file (a plain file, or the empty mount point CNI leaves behind)
        kind = None if exc.errno in (errno.ENOTTY, errno.EINVAL) else exc
    if kind != CLONE_NEWNET:
        os.close(fd)
        if isinstance(kind, OSError):
            raise NetworkError(f"cannot inspect {path}: {kind.strerror}")
        raise NetnsGone(f"{path} is not a network namespace")
    return fd


def check_netns(path: str) -> None:
    """NetnsGone (naming ``path``) unless it is a network namespace, as CNI or ``ip netns add`` makes."""
    os.close(open_netns(path))


@contextlib.contextmanager
def rtnl(path: str) -> Iterator[IPRoute]:
    """A blocking rtnetlink socket inside the netns at ``path``.

    pyroute2's sync IPRoute runs an event loop of its own: use it from a worker thread
    (asyncio.to_thread), never from a coroutine.
    """
    fd = open_netns(path)
    try:
        with IPRoute(netns=fd, flags=0) as ipr:
            yield ipr
    finally:
        os.close(fd)
