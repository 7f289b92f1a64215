"""`kabuto factory init|status|destroy`: VM templates, as `kata-runtime factory` (and the cache
daemon's `serve`, `cache-status`)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click

from kabuto.cli import factory_serve_cmd
from kabuto.hypervisor import resolve_config
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT
from kabuto.runtime.factory.template import (
    DEFAULT_INIT_TIMEOUT,
    clones_of,
    destroy_templates,
    find_template,
    init_template,
    list_templates,
    template_settings,
)


@click.group("factory")
def factory_group() -> None:
    """VM templates: new sandboxes start as clones of a saved VM (enable_template)."""


def _resolved(ctx: click.Context):  # type: ignore[no-untyped-def]
    obj = ctx.find_object(dict) or {}
    return resolve_config(obj.get("config_path"), hypervisor_name=obj.get("hypervisor_name"))


@factory_group.command("init")
@click.option("--timeout", type=click.FloatRange(min=1.0), default=DEFAULT_INIT_TIMEOUT, show_default=True,
              help="Seconds allowed to boot and save the template VM.")
@click.option("--jailer-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_JAILER_ROOT,
              show_default=True, help="Directory holding the per-VM directories.")
@click.pass_context
def init(ctx: click.Context, timeout: float, jailer_root: Path) -> None:
    """Boot a template VM for this configuration and save it under template_path."""
    resolved = _resolved(ctx)
    started = time.monotonic()
    template = asyncio.run(init_template(resolved, jailer_root, timeout))
    click.echo(f"template {template.key} made in {time.monotonic() - started:.1f}s: {template.directory}")


@factory_group.command("status")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """The templates under template_path, the one this configuration would use, and their clones."""
    resolved = _resolved(ctx)
    settings = template_settings(resolved.config, resolved.name, resolved.table)
    current, why = find_template(resolved)
    templates = [{"key": t.key, "directory": str(t.directory), "memory_mib": t.record.get("memory_mib"),
                  "created": t.record.get("created"), "current": current is not None and t.key == current.key,
                  "problem": t.problem(), "clones": clones_of(t)} for t in list_templates(settings.path)]
    report = {"enabled": settings.enabled, "template_path": str(settings.path), "templates": templates,
              "current": current.key if current else None, "why_not": why}
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"template mode: {'on' if settings.enabled else 'off'} ({settings.source}); "
               f"template_path {settings.path}")
    for t in templates:
        mark = "*" if t["current"] else " "
        click.echo(f"{mark} {t['key']}  {t['memory_mib']} MiB  {len(t['clones'])} running clones"
                   f"{'  DAMAGED: ' + t['problem'] if t['problem'] else ''}")
    if current is None:
        click.echo(f"this configuration would boot cold: {why}")


@factory_group.command("destroy")
@click.pass_context
def destroy(ctx: click.Context) -> None:
    """Remove every template under template_path (running clones keep running)."""
    resolved = _resolved(ctx)
    settings = template_settings(resolved.config, resolved.name, resolved.table)
    running_before = {t.key: clones_of(t) for t in list_templates(settings.path)}
    for template in destroy_templates(settings.path):
        running = running_before.get(template.key, [])
        click.echo(f"removed template {template.key}" +
                   (f" ({len(running)} running clones keep their memory)" if running else ""))


def register(cli: click.Group) -> None:
    cli.add_command(factory_group)
    factory_serve_cmd.register(factory_group)
