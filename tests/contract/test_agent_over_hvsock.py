"""The real Kabuto agent client through each fake VMM's hybrid vsock to the guest agent's code.

The agent runs on this host on a Unix socket (``--listen``) that the fake proxies ``CONNECT 1024``
to: this checks the backend's hvsock address and handshake, not that a guest serves vsock (the
shipped image's agent does so in a real guest in tests/integration/test_guest_vsock.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from vmm_fakes import FAKE_CLH, FAKE_FC, Recorder, leftovers

from kabuto.agent.client import wait_for_agent
from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor.cloud_hypervisor.backend import CloudHypervisor
from kabuto.hypervisor.firecracker.backend import Firecracker


@pytest.fixture
async def guest_agent() -> AsyncIterator[Path]:
    """``python -m kabuto.guest`` on this host, on a Unix socket the fake VMM proxies to."""
    sock = Path(tempfile.mkdtemp(prefix="kbg-", dir="/tmp")) / "agent.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kabuto.guest", "--listen", f"unix://{sock}", stderr=asyncio.subprocess.DEVNULL
    )
    for _ in range(200):
        if sock.exists():
            break
        await asyncio.sleep(0.05)
    yield sock
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    sock.unlink(missing_ok=True)
    sock.parent.rmdir()


@pytest.mark.parametrize("backend", [CloudHypervisor, Firecracker], ids=["cloud-hypervisor", "firecracker"])
async def test_agent_reachable(
    recorder: Recorder, jailer_root: Path, boot_files, guest_agent, monkeypatch, backend
) -> None:
    monkeypatch.setenv("FAKE_AGENT_SOCKET", str(guest_agent))
    config = HypervisorConfig(
        path=str(FAKE_CLH if backend is CloudHypervisor else FAKE_FC),
        kernel=str(boot_files["vmlinux"]),
        initrd=str(boot_files["initrd.img"]),
        default_memory=256,
        default_maxvcpus=1,
        shared_fs="none",
    )
    vm = backend(config, jailer_root=jailer_root)
    await vm.prepare_vm("agent1")
    await vm.start_vm(30)
    client = await wait_for_agent(await vm.get_agent_socket(), 30)
    try:
        assert await client.check()
        details = await client.guest_details()
        assert details.agent_version
    finally:
        await client.close()
    await vm.stop_vm()
    await vm.cleanup()
    assert leftovers(jailer_root) == []
