"""The runtime's side of the cache daemon (Kata's VMCache client): take a booted VM from it,
or say why not.

``CacheSource.take`` never leaves a half-started VM: a daemon that is gone, answers nothing,
breaks the protocol or hands out a VM that died means a cold boot (a log line says which), and
what a dead daemon left is reaped on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from kabuto.errors import KabutoError
from kabuto.hypervisor import restore_hypervisor
from kabuto.hypervisor.base import Hypervisor, HypervisorState, VmStatus
from kabuto.hypervisor.devices import DeviceKind
from kabuto.hypervisor.resolve import ResolvedConfig
from kabuto.image.cache import guest_code_hash
from kabuto.runtime.factory import cache_protocol as wire
from kabuto.runtime.factory import cache_store
from kabuto.runtime.factory.source import KEY_FILES, NOT_KEYED, WarmRequest, content_key
from kabuto.runtime.state import StateStore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0


def cache_endpoint(resolved: ResolvedConfig) -> Path | None:
    """Where the cache daemon serves, when ``[factory] vm_cache_number`` turns the cache on."""
    factory = resolved.config.factory
    return Path(factory.vm_cache_endpoint) if factory.vm_cache_number > 0 else None


def cache_key(resolved: ResolvedConfig, jailer_root: Path) -> str:
    """What a cached VM must match: the backend, its effective table (after annotations and the
    plugin's adjust), its files (by identity: a cached VM lives minutes, and hashing the VMM,
    kernel and initrd costs a quarter second per start), Kabuto's guest code and the jailer root."""
    table = resolved.table
    files = {key: _identity(value) for key in KEY_FILES if (value := getattr(table, key))}
    return content_key({"hypervisor": resolved.name,
                        "table": table.model_dump(mode="json", exclude=set(NOT_KEYED)), "files": files,
                        "guest_code": guest_code_hash(), "jailer_root": str(jailer_root)})


def _identity(path: str) -> list[int] | str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def store_of(jailer_root: Path) -> StateStore:
    """The state store whose VM directories are under ``jailer_root`` (``<root>/.vm``)."""
    return StateStore(jailer_root.parent)


class CacheSource:
    """A VM from the cache daemon at ``[factory] vm_cache_endpoint``, if it holds one ready."""

    name = "cache"

    async def take(self, request: WarmRequest) -> Hypervisor | None:
        resolved = request.resolved
        endpoint = cache_endpoint(resolved)
        assert endpoint is not None
        why = self._unusable(request)
        if why:
            log.info("sandbox %s: not from the factory cache (%s); booting a VM cold", request.sandbox_id,
                     why)
            return None
        store = store_of(request.jailer_root)
        state = await self._ask(endpoint, cache_key(resolved, request.jailer_root), request, store)
        if state is None:
            return None
        warm = await _adopt(state, store, endpoint)
        if warm is not None:
            log.info("sandbox %s: VM %s from the factory cache", request.sandbox_id, warm.id)
        return warm

    @staticmethod
    def _unusable(request: WarmRequest) -> str:
        """Why a cached VM cannot be made this sandbox's as a cold boot would be, or ""."""
        resolved = request.resolved
        capabilities = resolved.plugin.capabilities_for(resolved.table)
        if resolved.config.runtime.sandbox_cgroup_only:
            return "under sandbox_cgroup_only the VMM must start in the sandbox's cgroup"
        by_descriptor = capabilities.can_hotplug(DeviceKind.NETWORK) and capabilities.network_tap_fd
        if request.netns and not by_descriptor:
            return (f"the pod's NICs would be hot-plugged on taps of {request.netns}, which {resolved.name} "
                    "cannot take by descriptor")
        if request.claim is None:
            return "the caller cannot record a VM handed over"
        return ""

    async def _ask(self, endpoint: Path, key: str, request: WarmRequest,
                   store: StateStore) -> HypervisorState | None:
        """The state of the VM the daemon hands over, recorded by ``request.claim``; or None."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(endpoint), limit=wire.MAX_LINE)
        except (OSError, TimeoutError) as exc:
            why = "no daemon listens" if isinstance(exc, FileNotFoundError | ConnectionRefusedError) else \
                f"cannot connect: {getattr(exc, 'strerror', None) or exc or 'timed out'}"
            log.info("factory cache at %s: %s; booting a VM cold", endpoint, why)
            await cache_store.reap_dead_cache(store)
            return None
        state: HypervisorState | None = None
        try:
            await wire.send(writer, {"op": "take", "key": key})
            answer = await wire.receive(reader)
            if "none" in answer:
                log.info("factory cache at %s: %s; booting a VM cold", endpoint, answer["none"])
                return None
            try:
                offered = HypervisorState.from_dict(answer["vm"])
            except (KeyError, TypeError, ValueError) as exc:
                raise wire.CacheProtocolError(f"an answer that is no VM: {exc!r}") from None
            wanted = (request.resolved.name, store.jailer_root)
            if (offered.hypervisor_name, Path(offered.jailer_root)) != wanted:
                raise wire.CacheProtocolError(f"a {offered.hypervisor_name} VM under {offered.jailer_root}, "
                                              f"not {request.resolved.name} under {store.jailer_root}")
            assert request.claim is not None
            request.claim(offered)
            state = offered
            await wire.send(writer, {"op": "taken"})
            with contextlib.suppress(wire.CacheProtocolError):
                await wire.receive(reader)  # {"ok": true}; the VM is ours once recorded, answer or not
        except wire.CacheProtocolError as exc:
            if state is None:
                log.warning("factory cache at %s: the daemon failed mid-request (%s); booting a VM cold",
                            endpoint, exc)
                await cache_store.reap_dead_cache(store)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(wire.LINE_TIMEOUT):
                    await writer.wait_closed()
        return state


async def _adopt(state: HypervisorState, store: StateStore, endpoint: Path) -> Hypervisor | None:
    try:
        hypervisor = await restore_hypervisor(state, jailer_root=store.jailer_root)
    except KabutoError as exc:
        log.warning("factory cache at %s: VM %s cannot be adopted (%s); booting a VM cold", endpoint,
                    state.id, exc)
        await cache_store.destroy_vm(store, state.id)
        return None
    if hypervisor.status != VmStatus.RUNNING:
        log.warning("factory cache at %s: VM %s was handed out %s; booting a VM cold", endpoint, state.id,
                    hypervisor.status.value)
        await hypervisor.cleanup()
        cache_store.remove_entry(store, state.id)
        return None
    return hypervisor
