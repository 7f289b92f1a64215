"""``kabuto factory serve``: Kata's VMCache. Keeps ``vm_cache_number`` VMs booted to agent-ready
and hands one out per request over the Unix socket at ``vm_cache_endpoint``.

A cached VM is booted as a sandbox's VM is (the same configuration road, the same backend
calls), with no sandbox-specific device: no network, no container rootfs; only the shared-fs
device, exporting a directory of its own that the sandbox taking it then shares its rootfs
through (a shared filesystem cannot be hot-added by every backend: QEMU has no QMP fsdev_add).

A VM handed out is no longer the daemon's: it runs on after the daemon ends, and the sandbox
adopts its processes from its saved state. When the daemon stops (SIGTERM, SIGINT) it stops
every VM it still holds and removes their directories and its socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from kabuto.agent.client import wait_for_agent
from kabuto.errors import KabutoError
from kabuto.hypervisor import new_hypervisor
from kabuto.hypervisor.base import Hypervisor
from kabuto.hypervisor.devices import SharedFsDevice
from kabuto.hypervisor.resolve import ResolvedConfig
from kabuto.hypervisor.vmm_process import check_socket_path
from kabuto.runtime import rootfs as rootfs_delivery
from kabuto.runtime.factory import cache_protocol as wire
from kabuto.runtime.factory import cache_store
from kabuto.runtime.factory.cache import cache_key
from kabuto.runtime.state import StateStore

log = logging.getLogger(__name__)

SHARED_FS_DEVICE_ID = "kabuto-shared"
DEFAULT_BOOT_TIMEOUT = 120.0
#: after a failed boot, the next waits this long, doubling up to the maximum
RETRY_DELAY = 2.0
MAX_RETRY_DELAY = 60.0
#: a client gets this long to say it recorded the VM it was given; then the VM is destroyed
TAKEN_TIMEOUT = 10.0
#: concurrent clients served at once; more wait in the listen backlog
MAX_CLIENTS = 16


class CacheDaemonError(KabutoError):
    """The cache daemon cannot start; the message says why."""


class CacheDaemon:
    def __init__(self, resolved: ResolvedConfig, store: StateStore, *, number: int, endpoint: Path,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        if number < 1:
            raise CacheDaemonError(f"[factory] vm_cache_number is {number}: the cache needs at least 1")
        self.resolved = resolved
        self.store = store
        self.number = number
        self.endpoint = endpoint
        self.boot_timeout = boot_timeout
        self.key = cache_key(resolved, store.jailer_root)
        self.ready: collections.deque[Hypervisor] = collections.deque()
        self._booting = 0
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._clients = asyncio.Semaphore(MAX_CLIENTS)
        #: VMs handed out since start, and boots that failed (status)
        self.handed_out = 0
        self.failed_boots = 0

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT (or ``stop``), then stop every VM still held."""
        await cache_store.reap_dead_cache(self.store)
        server = await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        filler = asyncio.create_task(self._fill())
        log.info("factory cache: serving %d VM(s) of %s on %s", self.number, self.resolved.name,
                 self.endpoint)
        try:
            await self._stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            server.close()
            filler.cancel()
            await asyncio.gather(filler, return_exceptions=True)
            await self._stop_all()
            with contextlib.suppress(FileNotFoundError):
                self.endpoint.unlink()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), wire.LINE_TIMEOUT)
            log.info("factory cache: stopped")

    def stop(self) -> None:
        self._stopping.set()

    async def _listen(self) -> asyncio.AbstractServer:
        check_socket_path("factory cache", self.endpoint)
        self.endpoint.parent.mkdir(parents=True, exist_ok=True)
        if self.endpoint.exists() or self.endpoint.is_symlink():
            if await _answers(self.endpoint):
                raise CacheDaemonError(f"{self.endpoint}: another cache daemon serves there")
            self.endpoint.unlink()  # a dead daemon's socket
        # the socket file appears with its final mode: only root reaches the VMs
        old = os.umask(0o177)
        try:
            return await asyncio.start_unix_server(self._serve, path=str(self.endpoint), limit=wire.MAX_LINE)
        except OSError as exc:
            raise CacheDaemonError(f"cannot listen on {self.endpoint}: {exc.strerror}") from None
        finally:
            os.umask(old)

    async def _fill(self) -> None:
        """Boot one VM at a time until ``number`` are held (a 2-core host boots two no faster)."""
        delay = RETRY_DELAY
        while True:
            while len(self.ready) + self._booting >= self.number:
                self._changed.clear()
                await self._changed.wait()
            self._booting += 1
            try:
                vm = await self._boot()
            except KabutoError as exc:
                self.failed_boots += 1
                log.error("factory cache: booting a VM failed (next try in %gs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            finally:
                self._booting -= 1
                self._changed.set()
            delay = RETRY_DELAY
            self.ready.append(vm)
            self._changed.set()
            log.info("factory cache: VM %s ready (%d of %d)", vm.id, len(self.ready), self.number)

    async def _boot(self) -> Hypervisor:
        """A VM as VirtSandbox.create boots one, without the sandbox's devices; on any failure
        (cancellation included) nothing of it stays."""
        vm_id = f"cache-{secrets.token_hex(6)}"
        hypervisor = new_hypervisor(self.resolved, jailer_root=self.store.jailer_root)
        try:
            await hypervisor.check()
            shared = cache_store.make_entry(self.store, vm_id)
            await hypervisor.prepare_vm(vm_id)
            fs_kind = hypervisor.capabilities.preferred_shared_fs()
            if fs_kind is not None:
                await hypervisor.add_device(SharedFsDevice(SHARED_FS_DEVICE_ID, fs_kind, shared,
                                                           rootfs_delivery.SHARE_TAG))
            await hypervisor.start_vm(timeout=self.boot_timeout)
            agent_table = self.resolved.config.active_agent
            agent = await wait_for_agent(await hypervisor.get_agent_sockets(), self.boot_timeout,
                                         call_timeout=agent_table.request_timeout_ms / 1000,
                                         retry_interval=agent_table.dial_timeout_ms / 1000)
            await agent.close()
            # QMP takes one client: the sandbox that takes the VM connects
            await hypervisor.disconnect()
        except BaseException:
            await hypervisor.cleanup()
            cache_store.remove_entry(self.store, vm_id)
            raise
        return hypervisor

    async def _destroy(self, vm: Hypervisor) -> None:
        with contextlib.suppress(KabutoError, OSError):
            await vm.stop_vm()
        await vm.cleanup()
        cache_store.remove_entry(self.store, vm.id)

    async def _stop_all(self) -> None:
        while self.ready:
            await self._destroy(self.ready.popleft())

    # -- requests ---------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._clients:
            try:
                request = await wire.receive(reader)
                op = request.get("op")
                if op == "take":
                    await self._take(request, reader, writer)
                elif op == "status":
                    await wire.send(writer, self.status())
                else:
                    await wire.send(writer, {"error": f"unknown op {op!r}"})
            except wire.CacheProtocolError as exc:
                log.warning("factory cache: a client: %s", exc)
            finally:
                writer.close()
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), wire.LINE_TIMEOUT)

    def status(self) -> dict[str, Any]:
        return {"ready": len(self.ready), "booting": self._booting, "number": self.number, "key": self.key,
                "pid": os.getpid(), "handed_out": self.handed_out, "failed_boots": self.failed_boots}

    async def _take(self, request: dict[str, Any], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        if request.get("key") != self.key:
            await wire.send(writer, {"none": "the cache holds VMs of another configuration (backend, "
                                             "hypervisor table or state root differ)"})
            return
        vm = await self._next_ready()
        if vm is None:
            await wire.send(writer, {"none": "the cache is empty"
                                             + (f" ({self._booting} VM booting)" if self._booting else "")})
            return
        try:
            await wire.send(writer, {"vm": (await vm.save_state()).to_dict()})
            answer = await wire.receive(reader, TAKEN_TIMEOUT)
            if answer.get("op") != "taken":
                raise wire.CacheProtocolError(f"answered {answer!r} instead of taking it")
        except BaseException as exc:
            # the client may have touched it: it is never handed out again
            log.warning("factory cache: VM %s was offered and not taken (%s): destroying it", vm.id, exc)
            await self._destroy(vm)
            raise
        cache_store.disown(self.store, vm.id)
        await vm.release()
        self.handed_out += 1
        log.info("factory cache: VM %s handed out", vm.id)
        with contextlib.suppress(wire.CacheProtocolError):
            await wire.send(writer, {"ok": True})

    async def _next_ready(self) -> Hypervisor | None:
        """A held VM whose VMM still runs (the filler boots its replacement), or None."""
        while self.ready:
            vm = self.ready.popleft()
            self._changed.set()
            if await vm.get_pids():
                return vm
            log.warning("factory cache: VM %s died while cached (%s)", vm.id, vm.exit_reason() or "?")
            await self._destroy(vm)
        return None


async def _answers(path: Path) -> bool:
    with contextlib.suppress(OSError, TimeoutError):
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
        writer.close()
        return True
    return False
