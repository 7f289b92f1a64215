"""A tap of another network namespace, opened there for a VMM that runs elsewhere.

A VM booted before its pod's netns was known (a VM factory's) runs in the host's netns, where
the pod's taps are not. ``/dev/net/tun`` binds to the netns of the thread that opens it, so a
thread of its own enters the pod's netns (setns(2) moves only the calling thread), opens the
tap by name there, and the descriptors go to the VMM (QEMU: QMP getfd over SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import struct
import threading

from kabuto.errors import HypervisorError
from kabuto.hypervisor.vmm_process import netns_path

# linux/if_tun.h
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
CLONE_NEWNET = 0x40000000
IFREQ_SIZE = 40
#: a netns entry and a few opens: bounded all the same
OPEN_TIMEOUT = 10.0


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tap_sync(netns: str, name: str, queues: int = 1) -> list[int]:
    """``queues`` descriptors on tap ``name`` of ``netns`` (one per queue pair). Call from a
    thread that may end in any netns: ``open_tap`` gives it one of its own."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    ifreq = struct.pack("16sH", name.encode(), flags).ljust(IFREQ_SIZE, b"\0")
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"network namespace {path}: {exc.strerror}") from None
    fds: list[int] = []
    try:
        _setns(target)
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise HypervisorError(f"cannot open tap {name} in {path}: {exc.strerror}") from None
    finally:
        os.close(target)
    return fds


async def open_tap(netns: str, name: str, queues: int = 1) -> list[int]:
    """``open_tap_sync`` in a thread that ends afterwards (it stays in the pod's netns)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[int]] = loop.create_future()

    def deliver(fds: list[int], error: BaseException | None) -> None:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(fds)

    def run() -> None:
        try:
            fds = open_tap_sync(netns, name, queues)
        except BaseException as exc:  # handed to the waiting coroutine
            loop.call_soon_threadsafe(deliver, [], exc)
            return
        loop.call_soon_threadsafe(deliver, fds, None)

    threading.Thread(target=run, name=f"open-{name}", daemon=True).start()
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            return await asyncio.shield(done)
    except BaseException as exc:
        # the caller gave up (cancelled, or the bound passed): what the thread opens is closed
        done.add_done_callback(_close_opened)
        if isinstance(exc, TimeoutError):
            raise HypervisorError(f"opening tap {name} in {netns} took over {OPEN_TIMEOUT:g}s") from None
        raise


def _close_opened(done: asyncio.Future[list[int]]) -> None:
    if not done.cancelled() and done.exception() is None:
        for fd in done.result():
            os.close(fd)
