"""`kabuto image build` and `kabuto image path`: the guest kernel and initramfs."""

from __future__ import annotations

import asyncio
import json

import click
from rich.console import Console

from kabuto.cli import progress
from kabuto.config.model import HypervisorConfig
from kabuto.errors import ConfigError
from kabuto.image import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    DEFAULT_FLAVOUR,
    KERNEL_PACKAGES,
    STEPS,
    boot_paths,
)
from kabuto.image import build_image as build_guest_image


@click.group("image")
def image_group() -> None:
    """Build and locate the guest kernel and root image."""


@image_group.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds an image for the same inputs.")
@click.option("--kernel", "flavour", type=click.Choice(sorted(KERNEL_PACKAGES)), default=DEFAULT_FLAVOUR,
              show_default=True, help="Kernel flavour: Debian's generic or cloud (no virtio-9p), "
                   "or custom (built once per machine from linux-source).")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default=DEFAULT_COMPRESSION,
              show_default=True, help="Initramfs compression.")
def build_command(force: bool, flavour: str, compression: str) -> None:
    """Assemble the guest image from Debian packages into /var/cache/kabuto (cached by its inputs)."""
    console = Console(stderr=True)
    with progress.phases("guest image", STEPS) as report:
        image = asyncio.run(build_guest_image(force=force, flavour=flavour, compression=compression,
                                              progress=report))
    console.print(f"guest image {image.key}: {image.flavour} kernel {image.kernel_version}, "
                  f"{image.compression} initramfs")
    if image.missing_modules:
        console.print(f"[yellow]this kernel lacks: {', '.join(image.missing_modules)}[/yellow]")
    click.echo(f"kernel {image.kernel}\ninitrd {image.initrd}")


@image_group.command("path")
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.pass_context
def path_command(ctx: click.Context, output_format: str) -> None:
    """Print the kernel and initrd (or image) a VM will boot: the configuration's own, else the built one."""
    paths = boot_paths(_hypervisor_table(ctx.obj or {}))
    if output_format == "json":
        click.echo(json.dumps(paths))
    else:
        for name, value in paths.items():
            click.echo(f"{name} {value}")


def _hypervisor_table(options: dict[str, str | None]) -> HypervisorConfig | None:
    """The active hypervisor table; values are not validated, since a missing image is what this reports."""
    from kabuto.hypervisor import resolve_config

    try:
        resolved = resolve_config(options.get("config_path"), hypervisor_name=options.get("hypervisor_name"),
                                  validate=False)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return resolved.table


def register(cli: click.Group) -> None:
    """Add this module's commands to the `kabuto` group."""
    cli.add_command(image_group)
