"""The factory cache's client against fake daemons (no VM): every way a daemon can fail means a
cold boot with a message, within bounded time; what a dead daemon left is reaped, what a
sandbox claimed is not; a NIC by descriptor on QEMU's command."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import resolve_config
from kabuto.hypervisor.base import HypervisorState
from kabuto.hypervisor.devices import NetworkDevice
from kabuto.hypervisor.qemu.cmdline import netdev_args
from kabuto.processes import process_record
from kabuto.runtime import factory
from kabuto.runtime.factory import cache, cache_protocol, cache_store
from kabuto.runtime.factory.source import WarmRequest
from kabuto.runtime.state import SandboxRecord, StateStore


def resolved_with_cache(tmp_path: Path, number: int = 1, extra: str = ""):
    endpoint = tmp_path / "cache.sock"
    config = tmp_path / "configuration.toml"
    config.write_text(builtin_default_text() + f'\n[factory]\nvm_cache_number = {number}\n'
                      f'vm_cache_endpoint = "{endpoint}"\n')
    if extra:
        (tmp_path / "config.d").mkdir()
        (tmp_path / "config.d" / "50-test.toml").write_text(extra)
    return resolve_config(config, validate=False), endpoint


def request_for(tmp_path: Path, resolved, claimed: list[HypervisorState]) -> WarmRequest:
    store = StateStore(tmp_path / "root")
    return WarmRequest("sb", resolved, store.jailer_root, None, claim=claimed.append)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(endpoint: Path, handler: Handler) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(handler, path=str(endpoint))


def test_the_cache_is_the_source_only_when_vm_cache_number_is_set(tmp_path: Path) -> None:
    assert factory.warm_source(resolved_with_cache(tmp_path, number=0)[0]) is None
    assert isinstance(factory.warm_source(resolved_with_cache(tmp_path)[0]), cache.CacheSource)


def test_no_daemon_means_a_cold_boot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolved, endpoint = resolved_with_cache(tmp_path)
    claimed: list[HypervisorState] = []
    with caplog.at_level(logging.INFO):
        assert asyncio.run(cache.CacheSource().take(request_for(tmp_path, resolved, claimed))) is None
    assert f"factory cache at {endpoint}: no daemon listens; booting a VM cold" in caplog.text
    assert claimed == []


@pytest.mark.parametrize("behaviour, message", [
    ("silent", "no answer within"),
    ("hangs-up", "the peer closed the connection"),
    ("flood", "over the"),
    ("garbage", "not JSON"),
    ("not-a-vm", "an answer that is no VM"),
])
def test_a_broken_daemon_means_a_cold_boot_in_bounded_time(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, behaviour: str,
                                                           message: str) -> None:
    monkeypatch.setattr(cache_protocol, "LINE_TIMEOUT", 0.5)
    resolved, endpoint = resolved_with_cache(tmp_path)
    claimed: list[HypervisorState] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if behaviour == "silent":
            await asyncio.sleep(30)
        elif behaviour == "flood":
            writer.write(b"x" * (cache_protocol.MAX_LINE + 10))
        elif behaviour == "garbage":
            writer.write(b"{nope\n")
        elif behaviour == "not-a-vm":
            writer.write(json.dumps({"vm": {"id": 3}}).encode() + b"\n")
        await writer.drain()
        writer.close()

    async def run() -> None:
        server = await serve(endpoint, handler)
        try:
            async with asyncio.timeout(5):
                assert await cache.CacheSource().take(request_for(tmp_path, resolved, claimed)) is None
        finally:
            server.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    assert "the daemon failed mid-request" in caplog.text and message in caplog.text, caplog.text
    assert "booting a VM cold" in caplog.text
    assert claimed == []


def test_the_key_changes_with_the_configuration_and_the_jailer_root(tmp_path: Path) -> None:
    resolved, _ = resolved_with_cache(tmp_path)
    (tmp_path / "other").mkdir()
    other, _ = resolved_with_cache(tmp_path / "other", extra="[hypervisor.qemu]\ndefault_memory = 1024\n")
    store = StateStore(tmp_path / "root")
    assert cache.cache_key(resolved, store.jailer_root) != cache.cache_key(other, store.jailer_root)
    assert cache.cache_key(resolved, store.jailer_root) != cache.cache_key(resolved, tmp_path / "elsewhere")
    assert cache.cache_key(resolved, store.jailer_root) == cache.cache_key(resolved, store.jailer_root)


def test_sandbox_cgroup_only_boots_cold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    resolved, _ = resolved_with_cache(tmp_path, extra="")
    resolved.config.runtime.sandbox_cgroup_only = True
    with caplog.at_level(logging.INFO):
        assert asyncio.run(cache.CacheSource().take(request_for(tmp_path, resolved, []))) is None
    assert "under sandbox_cgroup_only" in caplog.text


def dead_pid_record() -> dict[str, object]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = process_record(child.pid)
    child.wait()
    return record


def test_what_a_dead_daemon_left_is_reaped_and_a_claimed_vm_is_not(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "root")
    for vm_id in ("cache-dead", "cache-claimed", "cache-live"):
        cache_store.make_entry(store, vm_id)
        (store.jailer_root / vm_id).mkdir(parents=True)
    dead = dead_pid_record()
    for vm_id in ("cache-dead", "cache-claimed"):
        owner = cache_store.entry_dir(store, vm_id) / cache_store.OWNER_FILE
        owner.write_text(json.dumps({"daemon": dead}))
    store.reserve(SandboxRecord(id="sb", hypervisor_name="qemu", config_path=None,
                                hypervisor_state={"id": "cache-claimed"}), ["sb"])
    assert asyncio.run(cache_store.reap_dead_cache(store)) == ["cache-dead"]
    assert not cache_store.entry_dir(store, "cache-dead").exists()
    assert not (store.jailer_root / "cache-dead").exists()
    # the sandbox's now: its shared directory stays, no daemon owns it any more
    assert cache_store.shared_dir(store, "cache-claimed").is_dir()
    assert not (cache_store.entry_dir(store, "cache-claimed") / cache_store.OWNER_FILE).exists()
    # this process is the live daemon
    assert (cache_store.entry_dir(store, "cache-live") / cache_store.OWNER_FILE).exists()
    cache_store.forget_shared(store, cache_store.shared_dir(store, "cache-claimed"))
    assert not cache_store.entry_dir(store, "cache-claimed").exists()
    cache_store.remove_entry(store, "cache-live")
    assert not cache_store.cache_root(store).exists()


def test_a_nic_by_descriptor_names_the_descriptors_not_the_tap() -> None:
    one = NetworkDevice("net0", tap_name="tap0_kabuto", netns="/run/netns/pod")
    assert netdev_args(one, False, ["tap-net0-0"]) == {"type": "tap", "id": "net-net0", "fd": "tap-net0-0",
                                                       "vhost": False}
    two = NetworkDevice("net1", tap_name="tap1_kabuto", netns="/run/netns/pod", queues=2)
    args = netdev_args(two, True, ["tap-net1-0", "tap-net1-1"])
    assert args == {"type": "tap", "id": "net-net1", "fds": "tap-net1-0:tap-net1-1", "vhost": True}
    assert "ifname" in netdev_args(one, False)
