"""The shipped image's agent serves AF_VSOCK in a real guest (QEMU, TCG here).

This host has no /dev/vhost-vsock, so the VM cannot get a vsock device and no host process
can reach the guest over vsock. What runs instead, in the real guest booted from the shipped
image and its /init: the agent as PID 1 with ``agent_vsock=on`` (serve vsock without a device)
and ``kabuto_vsock_probe=1``, which makes /init start ``kabuto.guest.probe`` beside it; the
probe connects through the kernel's vsock loopback transport to CID 1 at the agent's port (the
same listener a host reaches through a vsock device) and prints its ttrpc answers on the
console. The host meanwhile drives the same agent over virtio-serial. A boot without those
words shows that the agent looks for a vsock device where the 6.1 guest kernel puts it and,
finding none, serves virtio-serial only; one with neither channel powers off, saying why.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from test_runtime_helpers import bare_boot_console

from kabuto.agent.client import wait_for_agent
from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import new_hypervisor, resolve_config
from kabuto.hypervisor.devices import AGENT_VSOCK_PORT
from kabuto.hypervisor.qemu.backend import QemuHypervisor
from kabuto.image import GuestImage, build_image

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

BOOT_TIMEOUT = 120.0
AGENT_TIMEOUT = 60.0
# the probe starts with the agent and retries for 60 s (its own bound); this bounds the test's look
PROBE_TIMEOUT = 90.0
CONSOLE_POLL = 0.2
# the agent's --port-timeout (30 s) plus a TCG boot
NO_CHANNEL_TIMEOUT = 120.0
PROBE_LINE = re.compile(r"KABUTO-VSOCK-(OK|FAILED)[^\r\n]*")

# kernel parameters (and a configuration file) -> the running VM
Boot = Callable[..., Awaitable[QemuHypervisor]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def image() -> GuestImage:
    # This worktree's image, named explicitly: the machine-wide "current" one may be another's.
    return await build_image()


@pytest_asyncio.fixture(loop_scope="module")
async def boot(image: GuestImage, vm_root: Path) -> AsyncIterator[Boot]:
    """Boot the image with extra kernel parameters; stops and cleans every VM it started."""
    started: list[QemuHypervisor] = []

    async def start(kernel_params: str, config: Path | None = None) -> QemuHypervisor:
        resolved = resolve_config(config, hypervisor_name="qemu")
        resolved.table.kernel = str(image.kernel)
        resolved.table.initrd = str(image.initrd)
        # what the configuration put there (agent_vsock_port= for [agent.kata] server_port) stays
        resolved.table.kernel_params = f"{resolved.table.kernel_params} {kernel_params}".strip()
        vm = new_hypervisor(resolved, jailer_root=vm_root)
        assert isinstance(vm, QemuHypervisor)
        started.append(vm)
        await vm.prepare_vm(f"vsock{len(started)}")
        await vm.start_vm(BOOT_TIMEOUT)
        return vm

    yield start
    for vm in started:
        try:
            await vm.stop_vm()
        finally:
            await vm.cleanup()


async def console_line(vm: QemuHypervisor, pattern: re.Pattern[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = vm.paths.console_log.read_text(errors="replace") if vm.paths.console_log.exists() else ""
        if found := pattern.search(text):
            return found.group(0)
        await asyncio.sleep(CONSOLE_POLL)
    pytest.fail(f"no {pattern.pattern!r} on the console within {timeout:g}s:\n"
                f"{vm.paths.console_log.read_text(errors='replace')[-3000:]}")


@pytest.mark.parametrize("port", [AGENT_VSOCK_PORT, 2049], ids=["default-port", "server_port"])
async def test_the_shipped_agent_answers_over_vsock_in_the_guest(
    boot: Boot, image: GuestImage, port: int, tmp_path: Path
) -> None:
    config = None
    if port != AGENT_VSOCK_PORT:
        # the configuration's port, as a Kata file sets it (a drop-in here); resolve puts it on the
        # guest kernel command line
        config = tmp_path / "configuration.toml"
        config.write_text(builtin_default_text())
        (tmp_path / "config.d").mkdir()
        (tmp_path / "config.d" / "50-port.toml").write_text(f"[agent.kata]\nserver_port = {port}\n")
    vm = await boot("agent_vsock=on kabuto_vsock_probe=1", config)
    assert (f"agent_vsock_port={port}" in vm.config.kernel_params) == (port != AGENT_VSOCK_PORT)
    # the host's way in is virtio-serial here (no vhost-vsock); the agent serves both at once
    address = await vm.get_agent_socket()
    assert address.startswith("unix://")
    async with await wait_for_agent(address, AGENT_TIMEOUT) as agent:
        assert await agent.check()
        details = await agent.guest_details()
    assert details.is_init
    probe = await console_line(vm, PROBE_LINE, PROBE_TIMEOUT)
    assert probe == (f"KABUTO-VSOCK-OK cid=1 port={port} status=SERVING agent_is_init=True "
                     f"kernel={image.kernel_version}")
    console = vm.paths.console_log.read_text(errors="replace")
    assert f"serving on vsock port {port} (vsock device: none)" in console
    assert "serving on virtio-serial port agent.channel.0" in console
    # after the probe, the host still gets answers on virtio-serial
    async with await wait_for_agent(address, AGENT_TIMEOUT) as agent:
        assert await agent.check()


async def test_without_a_vsock_device_the_agent_serves_virtio_serial_only(boot: Boot) -> None:
    vm = await boot("")
    async with await wait_for_agent(await vm.get_agent_socket(), AGENT_TIMEOUT) as agent:
        assert await agent.check()
    # "device", not "transport": the driver's sysfs directory the agent reads exists in this kernel
    line = await console_line(vm, re.compile(r"not serving vsock: [^\r\n]*"), AGENT_TIMEOUT)
    assert line.startswith("not serving vsock: no vsock device (none bound to vmw_vsock_virtio_transport)")
    assert "serving on vsock port" not in vm.paths.console_log.read_text(errors="replace")


async def test_a_guest_without_any_agent_channel_powers_off_saying_so(image: GuestImage) -> None:
    # no virtio-serial port, no vsock device: the agent powers the VM off
    console = await bare_boot_console(image.kernel, image.initrd, "quiet panic=-1", NO_CHANNEL_TIMEOUT)
    assert ("kabuto-agent: fatal: ChannelError: no agent channel within 30s: no virtio-serial port named "
            "'agent.channel.0' appeared and no vsock device (none bound to vmw_vsock_virtio_transport); "
            "powering off") in console, console[-3000:]
    assert "Kernel panic" not in console, console[-3000:]
