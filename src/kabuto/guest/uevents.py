"""Wake-ups on the kernel's device events (a NETLINK_KOBJECT_UEVENT socket).

The agent looks again for virtio-serial ports and a vsock device when the kernel announces a
device, instead of scanning /sys ten times a second: that scan took a third to a half of a TCG
guest's CPU for the agent's first 30 seconds, which is when most containers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_EVENTS_GROUP = 1
# a uevent is a few hundred bytes; what does not fit is dropped: only the wake-up matters
EVENT_BUFFER = 8192


class DeviceEvents:
    """``wait(timeout)`` ends at the next device event or after ``timeout``; without the
    socket (a kernel that refuses it) it only sleeps, so callers keep their polling cadence."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        try:
            flags = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | flags, NETLINK_KOBJECT_UEVENT)
        except OSError as exc:
            log.info("no kernel device events (%s): polling instead", exc)
            return
        try:
            sock.bind((0, KERNEL_EVENTS_GROUP))
        except OSError as exc:
            sock.close()
            log.info("no kernel device events (%s): polling instead", exc)
            return
        self._socket = sock

    @property
    def listening(self) -> bool:
        return self._socket is not None

    async def wait(self, timeout: float) -> bool:
        """True if a device event came before ``timeout``; every queued event is consumed."""
        if self._socket is None:
            await asyncio.sleep(timeout)
            return False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_recv(self._socket, EVENT_BUFFER)
        except TimeoutError:
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        assert self._socket is not None
        while True:
            try:
                self._socket.recv(EVENT_BUFFER)
            except OSError:  # BlockingIOError once empty; ENOBUFS after an overflow is a wake-up too
                return

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def __enter__(self) -> DeviceEvents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
