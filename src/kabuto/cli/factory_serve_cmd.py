"""`kabuto factory serve`: the cache daemon ([factory] vm_cache_number, vm_cache_endpoint).

Its commands join the `factory` group of kabuto.cli.factory_cmd (the template commands).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from kabuto.hypervisor import resolve_config
from kabuto.runtime.factory import cache_protocol as wire
from kabuto.runtime.factory.cache_daemon import DEFAULT_BOOT_TIMEOUT, CacheDaemon
from kabuto.runtime.state import StateStore, default_state_root


@click.command("serve")
@click.option("--number", type=click.IntRange(min=1), default=None,
              help="VMs to keep booted (default: [factory] vm_cache_number).")
@click.option("--endpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Unix socket to serve on (default: [factory] vm_cache_endpoint).")
@click.option("--boot-timeout", type=click.FloatRange(min=1.0), default=DEFAULT_BOOT_TIMEOUT,
              show_default=True,
              help="Seconds allowed per VM from start to agent ready.")
@click.pass_context
def serve(ctx: click.Context, number: int | None, endpoint: Path | None, boot_timeout: float) -> None:
    """Keep VMs booted to agent-ready and hand one to each sandbox that starts, until SIGTERM or
    SIGINT; then stop every VM still held."""
    obj = ctx.find_object(dict) or {}
    resolved = resolve_config(obj.get("config_path"), hypervisor_name=obj.get("hypervisor_name"))
    for warning in resolved.config.warnings:
        click.echo(f"kabuto: {resolved.config.source}: {warning}", err=True)
    factory = resolved.config.factory
    store = StateStore(obj.get("root") or default_state_root())
    daemon = CacheDaemon(resolved, store, number=number or factory.vm_cache_number,
                         endpoint=endpoint or Path(factory.vm_cache_endpoint), boot_timeout=boot_timeout)
    asyncio.run(daemon.run())


@click.command("cache-status")
@click.option("--endpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The daemon's socket (default: [factory] vm_cache_endpoint).")
@click.pass_context
def cache_status(ctx: click.Context, endpoint: Path | None) -> None:
    """What the cache daemon holds (JSON): VMs ready and booting, handed out, failed boots."""
    obj = ctx.find_object(dict) or {}
    resolved = resolve_config(obj.get("config_path"), hypervisor_name=obj.get("hypervisor_name"))
    path = endpoint or Path(resolved.config.factory.vm_cache_endpoint)
    click.echo(json.dumps(asyncio.run(_status(path)), indent=1))


async def _status(path: Path) -> dict[str, object]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=wire.MAX_LINE),
                                                wire.LINE_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise click.ClickException(f"no cache daemon at {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    try:
        await wire.send(writer, {"op": "status"})
        return await wire.receive(reader)
    except wire.CacheProtocolError as exc:
        raise click.ClickException(f"cache daemon at {path}: {exc}") from None
    finally:
        writer.close()


def register(group: click.Group) -> None:
    """Add `serve` and `cache-status` to the `factory` group."""
    group.add_command(serve)
    group.add_command(cache_status)
