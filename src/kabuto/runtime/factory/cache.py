"""The runtime's side of the cache daemon: take a booted VM from it, or say why not.

``take`` never leaves a half-started VM: a daemon that is gone, answers nothing, breaks the
protocol or hands out a VM that died means a cold boot (a log line says which), and what a
dead daemon left is reaped on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from kabuto.errors import KabutoError
from kabuto.hypervisor import restore_hypervisor
from kabuto.hypervisor.base import Hypervisor, HypervisorState, VmStatus
from kabuto.hypervisor.resolve import ResolvedConfig
from kabuto.runtime.factory import cache_protocol as wire
from kabuto.runtime.factory import cache_store
from kabuto.runtime.state import StateStore

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0


def cache_endpoint(resolved: ResolvedConfig) -> Path | None:
    """Where the cache daemon serves, when ``[factory] vm_cache_number`` turns the cache on."""
    factory = resolved.config.factory
    return Path(factory.vm_cache_endpoint) if factory.vm_cache_number > 0 else None


async def take(resolved: ResolvedConfig, store: StateStore, *,
               claim: Callable[[HypervisorState], None]) -> Hypervisor | None:
    """A running VM of ``resolved``'s configuration from the daemon, if it holds one ready;
    None (logged) for a cold boot. ``claim`` records the VM's state
    (in the sandbox record) before the daemon lets it go, so a creator killed from then on
    leaves it to the sandbox reaper, never to nobody."""
    endpoint = cache_endpoint(resolved)
    if endpoint is None:
        return None
    key = wire.config_key(resolved.name, resolved.table.model_dump(mode="json"), store.root)
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
    claimed = False
    try:
        await wire.send(writer, {"op": "take", "key": key})
        answer = await wire.receive(reader)
        if "none" in answer:
            log.info("factory cache at %s: %s; booting a VM cold", endpoint, answer["none"])
            return None
        try:
            state = HypervisorState.from_dict(answer["vm"])
        except (KeyError, TypeError, ValueError) as exc:
            raise wire.CacheProtocolError(f"an answer that is no VM: {exc!r}") from None
        if state.hypervisor_name != resolved.name or Path(state.jailer_root) != store.jailer_root:
            raise wire.CacheProtocolError(f"a {state.hypervisor_name} VM under {state.jailer_root}, not "
                                          f"{resolved.name} under {store.jailer_root}")
        claim(state)
        claimed = True
        await wire.send(writer, {"op": "taken"})
        with contextlib.suppress(wire.CacheProtocolError):
            await wire.receive(reader)  # {"ok": true}; the VM is ours once recorded, answer or not
    except wire.CacheProtocolError as exc:
        if not claimed:
            log.warning("factory cache at %s: the daemon failed mid-request (%s); booting a VM cold",
                        endpoint, exc)
            await cache_store.reap_dead_cache(store)
            return None
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(wire.LINE_TIMEOUT):
                await writer.wait_closed()
    assert state is not None
    return await _adopt(state, store, endpoint)


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
