"""`kabuto`: the command-line entry point; each concern adds its commands from its own module."""

from __future__ import annotations

import logging
import sys

import click

from kabuto.cli import config_cmd, image_cmd, runtime_cmd, vm_cmd
from kabuto.errors import KabutoError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="KABUTO_CONFIG",
              help="configuration.toml to use (default: $KABUTO_CONFIG, /etc/kabuto/configuration.toml).")
@click.option("--hypervisor", "hypervisor_name", default=None, help="Override [runtime] hypervisor_name.")
@click.option("--debug", is_flag=True, help="Log debug messages to stderr.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, hypervisor_name: str | None, debug: bool) -> None:
    """Kabuto: containers in lightweight VMs, the VMM chosen by configuration."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["hypervisor_name"] = hypervisor_name


for module in (config_cmd, image_cmd, vm_cmd, runtime_cmd):
    module.register(cli)


def main() -> None:
    try:
        # without standalone mode click returns ctx.exit()'s code instead of exiting
        code = cli(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KabutoError as exc:
        click.echo(f"kabuto: {exc}", err=True)
        sys.exit(1)
