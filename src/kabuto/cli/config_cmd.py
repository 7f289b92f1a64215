"""Placeholder: commands land here."""

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the `kabuto` group."""
