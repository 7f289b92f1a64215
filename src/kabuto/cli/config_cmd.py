"""`kabuto config show|validate`, `kabuto hypervisors` and `kabuto check`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kabuto.config import KabutoConfig
from kabuto.errors import ConfigError, HypervisorUnavailable
from kabuto.hypervisor.plugin import Availability
from kabuto.hypervisor.registry import (
    aliases_of,
    get_plugin,
    hypervisor_names,
    load_warnings,
    registered_names,
)
from kabuto.hypervisor.resolve import adjusted_table, resolve_config
from kabuto.runtime import network

_CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="configuration.toml to use (overrides the global --config).",
)


def _options(ctx: click.Context, config_path: str | None) -> tuple[str | None, str | None]:
    obj = ctx.find_object(dict) or {}
    return config_path or obj.get("config_path"), obj.get("hypervisor_name")


def _echo_warnings(config: KabutoConfig) -> None:
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)


def _echo_error(error: ConfigError) -> None:
    if error.problems:
        click.echo(str(error).splitlines()[0], err=True)
        for problem in error.problems:
            click.echo(str(problem), err=True)
    else:
        click.echo(str(error), err=True)


@click.group("config")
def config_group() -> None:
    """Show or validate the resolved configuration."""


@config_group.command("show")
@_CONFIG_OPTION
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True)
@click.option("--no-validate", is_flag=True,
              help="Show the merged and adjusted configuration even if it would not validate.")
@click.pass_context
def show(ctx: click.Context, config_path: str | None, fmt: str, no_validate: bool) -> None:
    """Print the resolved configuration (after drop-ins and plugin defaults)."""
    path, hypervisor = _options(ctx, config_path)
    try:
        config = resolve_config(path, hypervisor_name=hypervisor, validate=not no_validate).config
    except ConfigError as exc:
        _echo_error(exc)
        ctx.exit(1)
    _echo_warnings(config)
    if fmt == "json":
        click.echo(json.dumps(config.to_dict(), indent=2))
    else:
        sources = ", ".join([config.source, *config.dropins])
        click.echo(f"# resolved from {sources}\n" + config.to_toml(), nl=False)


@config_group.command("validate")
@_CONFIG_OPTION
@click.pass_context
def validate(ctx: click.Context, config_path: str | None) -> None:
    """Exit 1 with one line per problem (key = value: reason), else print 'configuration OK'."""
    path, hypervisor = _options(ctx, config_path)
    try:
        config = resolve_config(path, hypervisor_name=hypervisor).config
    except ConfigError as exc:
        _echo_error(exc)
        ctx.exit(1)
    click.echo(f"configuration OK ({config.source}, hypervisor {config.hypervisor_name})")
    _echo_warnings(config)


def _describe(name: str, config: KabutoConfig | None) -> dict[str, Any]:
    """One plugin's entry for `kabuto hypervisors`; a broken plugin is shown, not fatal."""
    plugin = get_plugin(name)
    entry: dict[str, Any] = {
        "name": name,
        "aliases": aliases_of(name),
        "active": config is not None and config.hypervisor_name == name,
    }
    try:
        table = adjusted_table(config, name)
        availability = plugin.availability(table)
    except Exception as exc:  # a third-party plugin's bug must not hide the others
        availability = Availability(False, [f"plugin error: {exc}"])
        table = None
    try:
        # as this configuration would have it (shared_fs, disable_block_device_use...)
        caps = plugin.capabilities_for(table) if table is not None else plugin.capabilities()
        capabilities: dict[str, Any] = caps.to_dict()
    except Exception as exc:
        capabilities = {"error": str(exc)}
    entry["availability"] = availability.to_dict()
    entry["capabilities"] = capabilities
    return entry


def _capability_summary(caps: dict[str, Any]) -> str:
    if "error" in caps:
        return f"error: {caps['error']}"
    lines = [
        f"hot-plug: {', '.join(caps['hotplug']) or 'none'}",
        f"pause: {'yes' if caps['pause'] else 'no'}, snapshot: {'yes' if caps['snapshot'] else 'no'}",
        f"shared fs: {', '.join(caps['shared_fs']) or 'none'}",
        f"agent: {', '.join(caps['agent_channels']) or 'none'}",
        f"network: {'virtio-net on taps' if caps.get('network') else 'none'}",
    ]
    if caps["jailer"]:
        lines.append("jailer")
    return "\n".join(lines)


@click.command("hypervisors")
@_CONFIG_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def hypervisors(ctx: click.Context, config_path: str | None, fmt: str) -> None:
    """List the registered hypervisor plugins, their availability here and capabilities."""
    path, hypervisor = _options(ctx, config_path)
    config: KabutoConfig | None
    try:
        config = resolve_config(path, hypervisor_name=hypervisor, validate=False).config
    except ConfigError as exc:
        reason = str(exc).splitlines()[0]
        click.echo(f"warning: configuration not used ({reason}); showing defaults", err=True)
        config = None
    for warning in load_warnings():
        click.echo(f"warning: {warning}", err=True)
    entries = [_describe(name, config) for name in registered_names()]
    if fmt == "json":
        click.echo(json.dumps(entries, indent=2))
        return
    table = Table(title="Hypervisors", show_lines=True)
    table.add_column("name", no_wrap=True)
    table.add_column("aliases", overflow="fold")
    table.add_column("available", no_wrap=True)
    table.add_column("binary, accelerator and why", ratio=3, overflow="fold")
    table.add_column("capabilities", ratio=2)
    for entry in entries:
        availability = entry["availability"]
        name = entry["name"] + ("\n(configured)" if entry["active"] else "")
        accelerator = availability["accelerator"]
        facts = [availability["binary"], accelerator and f"accel {accelerator}"]
        table.add_row(
            name,
            "\n".join(entry["aliases"]),
            "[green]yes[/green]" if availability["available"] else "[red]no[/red]",
            "\n".join([*filter(None, facts), *availability["reasons"]]),
            _capability_summary(entry["capabilities"]),
        )
    Console(file=sys.stdout, width=max(120, Console().width)).print(table)


@click.command("check")
@_CONFIG_OPTION
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def check(ctx: click.Context, config_path: str | None, fmt: str) -> None:
    """Can this host run the configured hypervisor? Exit 1 (with the reasons) if not."""
    path, hypervisor = _options(ctx, config_path)
    report: dict[str, Any] = {"hypervisor": hypervisor, "source": None, "problems": [], "availability": None}
    try:
        resolved = resolve_config(path, hypervisor_name=hypervisor)
    except ConfigError as exc:
        report["problems"] = [str(p) for p in exc.problems] or [str(exc)]
        if hypervisor:
            report["hypervisor"] = hypervisor_names().canonical(hypervisor)
    else:
        config, plugin = resolved.config, resolved.plugin
        report.update(hypervisor=config.hypervisor_name, source=config.source)
        try:
            availability = plugin.availability(config.active_hypervisor)
        except Exception as exc:  # a broken plugin means this host cannot run it
            availability = Availability(False, [f"plugin error: {exc}"])
        try:
            plugin.backend()
        except HypervisorUnavailable as exc:
            availability.available = False
            availability.reasons.append(str(exc))
        except Exception as exc:
            availability.available = False
            availability.reasons.append(f"no backend: {exc}")
        report["availability"] = availability.to_dict()
    # what pod networking needs here: information, not a verdict (a VM without a pod netns needs none)
    report["networking"] = network.host_facts()
    ok = not report["problems"] and report["availability"]["available"]
    report["ok"] = ok
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        _echo_check(report)
    ctx.exit(0 if ok else 1)


def _echo_check(report: dict[str, Any]) -> None:
    name = report["hypervisor"] or "the configured hypervisor"
    if report["problems"]:
        click.echo(f"configuration is invalid ({len(report['problems'])} problem(s)):")
        for problem in report["problems"]:
            click.echo(f"  {problem}")
        click.echo(f"kabuto cannot run {name} on this host")
        return
    availability = report["availability"]
    click.echo(f"hypervisor: {name} (configuration: {report['source']})")
    if availability["binary"]:
        click.echo(f"binary: {availability['binary']}")
    if availability["accelerator"]:
        click.echo(f"accelerator: {availability['accelerator']}")
    for reason in availability["reasons"]:
        click.echo(f"  {reason}")
    click.echo("networking:")
    for fact in report["networking"]:
        click.echo(f"  {fact}")
    verdict = "can" if availability["available"] else "cannot"
    click.echo(f"kabuto {verdict} run {name} on this host")


def register(cli: click.Group) -> None:
    """Add this module's commands to the `kabuto` group."""
    cli.add_command(config_group)
    cli.add_command(hypervisors)
    cli.add_command(check)
