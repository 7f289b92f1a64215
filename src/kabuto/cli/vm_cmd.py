"""`kabuto vm boot`: boot a sandbox VM, check its agent, show the guest and the boot phases, stop it."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from kabuto.agent.client import GuestDetails, wait_for_agent
from kabuto.cli import progress
from kabuto.hypervisor import new_hypervisor, resolve_config
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT

DEFAULT_BOOT_TIMEOUT = 60.0
#: what `kabuto vm boot` reports as it goes (a bar on a terminal, a line each otherwise)
BOOT_STEPS = (
    "checking the host",
    "starting the VM (QEMU, the guest kernel, /init, the agent)",
    "waiting for the agent to answer",
    "reading the guest's details",
    "stopping the VM",
)


@dataclass
class BootReport:
    hypervisor: str
    vm_id: str
    guest: dict[str, Any] = field(default_factory=dict)
    #: phase -> seconds
    phases: dict[str, float] = field(default_factory=dict)


async def boot_once(
    config_path: str | None, hypervisor_name: str | None, timeout: float, jailer_root: Path,
    progress: Callable[[str], None] | None = None,
) -> BootReport:
    """Boot, health-check and stop one VM; whatever happens, nothing is left behind. ``progress``
    hears each of BOOT_STEPS as it begins."""
    step = progress or (lambda name: None)
    resolved = resolve_config(config_path, hypervisor_name=hypervisor_name)
    hypervisor = new_hypervisor(resolved, jailer_root=jailer_root)
    report = BootReport(resolved.name, f"boot-{secrets.token_hex(4)}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        step(BOOT_STEPS[0])
        await hypervisor.check()
        started = time.monotonic()
        step(BOOT_STEPS[1])
        await hypervisor.prepare_vm(report.vm_id)
        await hypervisor.start_vm(timeout=max(deadline - loop.time(), 0.001))
        vm_started = time.monotonic() - started
        step(BOOT_STEPS[2])
        agent = await wait_for_agent(await hypervisor.get_agent_socket(), max(deadline - loop.time(), 0.001))
        agent_ready = time.monotonic() - started
        step(BOOT_STEPS[3])
        async with agent:
            details = await agent.guest_details(timeout=max(deadline - loop.time(), 0.001))
        report.guest = asdict(details)
        report.phases = _phases(hypervisor.boot_timings, vm_started, agent_ready, details)
        step(BOOT_STEPS[4])
        await hypervisor.stop_vm()
    finally:
        await hypervisor.cleanup()
    return report


def _phases(
    backend: dict[str, float], vm_started: float, agent_ready: float, details: GuestDetails
) -> dict[str, float]:
    phases: dict[str, float] = {}
    # a backend that reports its own phases (QEMU: QMP answering, the guest opening the agent's
    # port) splits off the VMM start-up and the guest's boot
    if "qmp_ready" in backend:
        phases["vmm_spawn"] = backend["qmp_ready"]
    if "guest_port_open" in backend:
        phases["guest_port_open"] = backend["guest_port_open"]
    phases["vm_started"] = vm_started
    # the guest's own clock: kernel start until /init, until the agent (PID 1) was running, and
    # until it served its channel
    if details.init_started_uptime_seconds:
        phases["kernel_to_init"] = details.init_started_uptime_seconds
    phases["kernel_to_agent"] = details.agent_started_uptime_seconds
    if details.agent_serving_uptime_seconds:
        phases["kernel_to_serving"] = details.agent_serving_uptime_seconds
    phases["agent_ready"] = agent_ready
    return phases


_PHASE_LABELS = {
    "vmm_spawn": "VMM spawn (process to control socket answering)",
    "guest_port_open": "guest opened the agent's port",
    "vm_started": "VM started (start_vm returned)",
    "kernel_to_init": "kernel to /init (guest clock)",
    "kernel_to_agent": "kernel to agent running (guest clock)",
    "kernel_to_serving": "kernel to agent serving (guest clock)",
    "agent_ready": "agent ready (health check answered)",
}


@click.group("vm")
def vm_group() -> None:
    """Boot and inspect sandbox VMs."""


@vm_group.command("boot")
@click.option("--hypervisor", "hypervisor_name", default=None, help="VMM to use (overrides the config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="configuration.toml to use (overrides the global --config).")
@click.option("--timeout", type=click.FloatRange(min=1.0), default=DEFAULT_BOOT_TIMEOUT, show_default=True,
              help="Seconds allowed from start to agent ready.")
@click.option("--jailer-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_JAILER_ROOT,
              show_default=True, help="Directory holding the per-VM directories.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def boot(ctx: click.Context, hypervisor_name: str | None, config_path: str | None, timeout: float,
         jailer_root: Path, fmt: str) -> None:
    """Boot a VM, check its agent, print the guest details and boot phases, then stop it."""
    obj = ctx.find_object(dict) or {}
    try:
        with progress.phases("VM boot", BOOT_STEPS) as report_step:
            report = asyncio.run(boot_once(config_path or obj.get("config_path"),
                                           hypervisor_name or obj.get("hypervisor_name"), timeout,
                                           jailer_root, progress=report_step))
    except KeyboardInterrupt:
        # asyncio.run cancelled the boot; its finally clauses already stopped and cleaned up
        click.echo("interrupted; the VM was stopped and removed", err=True)
        ctx.exit(130)
    if fmt == "json":
        click.echo(json.dumps(asdict(report), indent=2))
        return
    guest = report.guest
    click.echo(f"{report.hypervisor} VM {report.vm_id}: agent answered")
    click.echo(f"  kernel   {guest['kernel_release']} ({guest['machine']})")
    click.echo(f"  memory   {guest['mem_total_bytes'] / 2**20:.0f} MiB")
    click.echo(f"  cpus     {guest['online_cpus']}")
    click.echo(f"  agent    {guest['agent_version']} (pid 1: {'yes' if guest['is_init'] else 'no'})")
    click.echo("boot phases (seconds):")
    for phase, seconds in report.phases.items():
        click.echo(f"  {seconds:7.3f}  {_PHASE_LABELS.get(phase, phase)}")
    click.echo("VM stopped and cleaned up")


def register(cli: click.Group) -> None:
    """Add this module's commands to the `kabuto` group."""
    cli.add_command(vm_group)
