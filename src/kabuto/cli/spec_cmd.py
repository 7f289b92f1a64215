"""``kabuto features`` and ``kabuto spec``: what the runtime supports and a bundle's starting point,
as ``runc features`` and ``runc spec`` print them."""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click

from kabuto.runtime.bundle import CONFIG_FILE, default_spec
from kabuto.runtime.commands import OCI_VERSION
from kabuto.runtime.features import features


def _own_version() -> str:
    try:
        return version("kabuto")
    except PackageNotFoundError:
        return "unknown"


@click.command("features")
def features_command() -> None:
    """Print the features this runtime supports (runc's JSON shape)."""
    click.echo(json.dumps(features(OCI_VERSION, _own_version()), indent=4))


@click.command("spec")
@click.option("-b", "--bundle", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write config.json into this directory (default: the current one).")
@click.argument("args", nargs=-1)
def spec_command(bundle: Path | None, args: tuple[str, ...]) -> None:
    """Write the default config.json, as `runc spec` does (process: sh with a terminal)."""
    path = (bundle or Path(os.getcwd())) / CONFIG_FILE
    if args:
        raise click.UsageError("spec takes no arguments")
    if path.exists():
        raise click.ClickException(f"File {CONFIG_FILE} exists. Remove it first")
    try:
        with open(path, "x") as file:
            json.dump(default_spec(["sh"], terminal=True), file, indent="\t")
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None


def register(cli: click.Group) -> None:
    cli.add_command(features_command)
    cli.add_command(spec_command)
