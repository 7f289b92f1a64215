"""The `kabuto` group loads a command's module when the command runs: every command is found, and
`kabuto run`'s path imports none of what other commands or a pod netns need (the cold start cut)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click

from kabuto.cli.main import COMMAND_MODULES, cli


def test_every_module_adds_exactly_the_commands_named_for_it() -> None:
    for module_name in sorted(set(COMMAND_MODULES.values())):
        group = click.Group()
        importlib.import_module(f"kabuto.cli.{module_name}").register(group)
        named = {command for command, module in COMMAND_MODULES.items() if module == module_name}
        assert set(group.commands) == named, module_name


def test_help_lists_every_command() -> None:
    context = click.Context(cli)
    assert cli.list_commands(context) == sorted(COMMAND_MODULES)
    assert all(cli.get_command(context, name) is not None for name in COMMAND_MODULES)


def test_kabuto_run_s_imports_leave_out_rich_pyroute2_and_the_image_builder() -> None:
    code = ("import sys, kabuto.cli.main, kabuto.cli.runtime_cmd; "
            "print(sorted(m for m in ('rich', 'pyroute2', 'kabuto.image.builder', 'kabuto.ttrpc.client')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    # the agent client is the host's: it stays
    assert out.stdout.strip() == "['kabuto.ttrpc.client']", out.stderr


def test_the_guest_agent_starts_without_ttrpc_s_client() -> None:
    code = "import sys, kabuto.guest.__main__; print('kabuto.ttrpc.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr
