"""One QMP session with a VM's QEMU (qemu.qmp's QMPClient): connect, bounded commands, events,
file descriptors. QMP takes one client at a time, so a process that leaves the VM to others
disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.vmm_process import VmmProcess

QMP_COMMAND_TIMEOUT = 10.0
QMP_RECONNECT_TIMEOUT = 5.0
POLL_INTERVAL = 0.02

# qemu.qmp logs every failure at ERROR and then raises it; kabuto reports the exception itself,
# so the library's copy only shows with debug logging (it reached users as a stray ERROR line)
_library_log = logging.getLogger(__name__ + ".library")
_library_log.addFilter(lambda record: _library_log.isEnabledFor(logging.DEBUG))


class QmpSession:
    def __init__(self, vm_id: str, socket_path: Path) -> None:
        self.vm_id = vm_id
        self.socket_path = socket_path
        self._client: QMPClient | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self, qemu: VmmProcess | None, wait_for_socket: bool) -> None:
        """Connect; while booting (``wait_for_socket``), poll until QEMU created the socket,
        failing as soon as ``qemu`` exits. Otherwise one bounded attempt."""
        client = QMPClient(f"kabuto-{self.vm_id}")
        client.logger = _library_log
        socket_path = str(self.socket_path)
        try:
            async with asyncio.timeout(None if wait_for_socket else QMP_RECONNECT_TIMEOUT):
                while True:
                    if qemu is not None and qemu.returncode is not None:
                        raise HypervisorError(
                            f"qemu: QEMU exited with status {qemu.returncode} during start-up")
                    # only try once QEMU created the socket: qemu.qmp logs every failed connect
                    if not wait_for_socket or self.socket_path.exists():
                        try:
                            await client.connect(socket_path)
                            break
                        except (QMPError, OSError):
                            if not wait_for_socket:
                                raise
                    await asyncio.sleep(POLL_INTERVAL)
        except (QMPError, OSError, TimeoutError) as exc:
            raise HypervisorError(f"qemu: cannot connect to QMP at {socket_path}: {exc}") from None
        self._client = client

    async def call(self, command: str, arguments: dict[str, Any] | None = None,
                   timeout: float = QMP_COMMAND_TIMEOUT) -> Any:
        if self._client is None:
            raise HypervisorError(f"qemu: {command}: not connected to QMP")
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except TimeoutError:
            raise VmTimeout(f"qemu: QMP {command} got no answer within {timeout:g}s") from None
        except QMPError as exc:
            raise HypervisorError(f"qemu: QMP {command} failed: {exc}") from None

    @contextlib.contextmanager
    def listen(self, listener: EventListener) -> Iterator[EventListener]:
        if self._client is None:
            raise HypervisorError("qemu: not connected to QMP")
        with self._client.listen(listener):
            yield listener

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU ``fd`` as ``name`` (no shell needed, and it works under -sandbox spawn=deny)."""
        if self._client is None:
            raise HypervisorError("qemu: not connected to QMP")
        self._client.send_fd_scm(fd)
        await self.call("getfd", {"fdname": name})

    async def disconnect(self) -> None:
        if self._client is not None:
            # disconnect() re-raises whatever ended the session (EOFError when QEMU died)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(QMP_COMMAND_TIMEOUT):
                    await self._client.disconnect()
            self._client = None
