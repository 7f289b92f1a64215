"""`kabuto`: the command-line entry point; each concern adds its commands from its own module.

The global options are runc's (``--root``, ``--log``, ``--log-format``, ``--systemd-cgroup``,
``--debug``, ``--version``) plus Kabuto's own ``--config`` and ``--hypervisor``, so callers
that drive runc (conmon, containerd's runc shim, the OCI validation suite) can drive kabuto.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from kabuto.cli.logs import RuntimeLog
from kabuto.errors import KabutoError
from kabuto.runtime.state import STATE_ROOT_ENV

#: command -> the kabuto.cli module whose register() adds it. A command's module is imported
#: only when that command runs (or help lists them all): `kabuto run` pays for no rich, no image
#: builder and no configuration tooling (docs/benchmarks.md, cold start)
COMMAND_MODULES = {
    **dict.fromkeys(("config", "hypervisors", "check"), "config_cmd"),
    "factory": "factory_cmd",
    "image": "image_cmd",
    "vm": "vm_cmd",
    **dict.fromkeys(("run", "create", "start", "state", "pause", "resume", "update", "kill", "delete",
                     "exec", "list", "ps", "events", "checkpoint", "restore"), "runtime_cmd"),
    **dict.fromkeys(("features", "spec"), "spec_cmd"),
}

# the log the global options set up; main() reports failures through it
_log: list[RuntimeLog] = []


def version_text() -> str:
    """runc's --version lines: the runtime's version, then the runtime-spec version it implements."""
    from importlib.metadata import PackageNotFoundError, version

    from kabuto.runtime.commands import OCI_VERSION

    try:
        own = version("kabuto")
    except PackageNotFoundError:
        own = "unknown"
    return f"kabuto version {own}\nspec: {OCI_VERSION}\npython: {sys.version.split()[0]}"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


class LazyGroup(click.Group):
    """A group whose commands are added by their module's register() the first time one is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | COMMAND_MODULES.keys())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(f"kabuto.cli.{COMMAND_MODULES[cmd_name]}")
            module.register(self)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="KABUTO_CONFIG",
              help="configuration.toml to use (default: $KABUTO_CONFIG, /etc/kabuto/configuration.toml).")
@click.option("--hypervisor", "hypervisor_name", default=None, help="Override [runtime] hypervisor_name.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), envvar=STATE_ROOT_ENV, default=None,
              help="State directory (default: $KABUTO_STATE_ROOT, /run/kabuto).")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), default=None,
              help="Append log lines (errors, warnings; more with --debug) to this file (default: stderr).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="runc's log line formats.")
@click.option("--systemd-cgroup", is_flag=True,
              help="linux.cgroupsPath is systemd's slice:prefix:name (as runc's flag).")
@click.option("--debug", is_flag=True, help="Log debug messages too.")
@click.option("-v", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, hypervisor_name: str | None, root: Path | None,
        log_path: str | None, log_format: str, systemd_cgroup: bool, debug: bool) -> None:
    """Kabuto: containers in lightweight VMs, the VMM chosen by configuration."""
    try:
        _log[:] = [RuntimeLog(log_path, log_format, debug)]
    except OSError as exc:
        raise click.BadParameter(f"cannot open {log_path}: {exc.strerror}", param_hint="--log") from None
    ctx.ensure_object(dict)
    ctx.obj.update(config_path=config_path, hypervisor_name=hypervisor_name, root=root,
                   systemd_cgroup=systemd_cgroup)


def _fail(message: str, code: int) -> None:
    if _log:
        _log[0].error(message)
    else:
        click.echo(f"kabuto: {message}", err=True)
    sys.exit(code)


def main() -> None:
    try:
        # without standalone mode click returns ctx.exit()'s code instead of exiting
        code = cli(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        if not _log or _log[0].plain:
            exc.show()  # usage and hint for a person (the global options themselves may be wrong)
            sys.exit(exc.exit_code)
        _fail(exc.format_message(), exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KabutoError as exc:
        _fail(str(exc), 1)
