"""`kabuto config show|validate`, `kabuto hypervisors` and `kabuto check` through click's runner."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib

import pytest
from click.testing import CliRunner

import kabuto.image
from kabuto.cli import main as cli_main
from kabuto.cli.main import cli
from kabuto.config import loader
from kabuto.hypervisor import registry
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.plugin import Availability, BasePlugin


class ToyPlugin(BasePlugin):
    aliases = ("toy-alias",)
    default_memory_mib = 256

    def __init__(self, available: bool = True) -> None:
        self.available = available

    def capabilities(self) -> Capabilities:
        return Capabilities(pause=True)

    def availability(self, table):
        if self.available:
            return Availability(True, ["nothing needed"], "/bin/true", "tcg")
        return Availability(False, ["toy binary not found"])

    def backend(self):
        from kabuto.hypervisor import Hypervisor

        return Hypervisor


class BrokenPlugin(ToyPlugin):
    aliases = ()

    def availability(self, table):
        raise RuntimeError("plugin bug")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)
    registry.registered_names()
    monkeypatch.setattr(registry, "_plugins", dict(registry._plugins))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    registry.register_hypervisor_plugin("toy", ToyPlugin())
    down = ToyPlugin(available=False)
    down.aliases = ()
    registry.register_hypervisor_plugin("toy-down", down)
    registry.register_hypervisor_plugin("toy-broken", BrokenPlugin())


@pytest.fixture
def good(tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_text("k")
    initrd.write_text("i")
    file = tmp_path / "good.toml"
    file.write_text(textwrap.dedent(f"""\
        [runtime]
        hypervisor_name = "toy"
        [hypervisor.toy]
        kernel = "{kernel}"
        initrd = "{initrd}"
        default_memory = 300
        mystery = 1
        [hypervisor.toy-down]
        kernel = "{kernel}"
        initrd = "{initrd}"
        """))
    return file


@pytest.fixture
def bad(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text('[runtime]\nhypervisor_name = "toy"\n'
                    '[hypervisor.toy]\ndefault_vcpus = 0\ndefault_memory = 8\n')
    return file


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("position", ["global", "subcommand"])
def test_show_toml_in_either_position(good, position):
    args = ["--config", str(good), "config", "show"] if position == "global" else [
        "config", "show", "--config", str(good)]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"# resolved from {good}\n")
    shown = tomllib.loads(result.stdout)
    assert shown["hypervisor"]["toy"]["default_memory"] == 300
    assert shown["hypervisor"]["toy"]["mystery"] == 1
    assert "warning: unknown key hypervisor.toy.mystery (kept, not used)" in result.stderr


def test_subcommand_config_overrides_the_global_one(good, bad):
    assert run("--config", str(bad), "config", "show", "--config", str(good)).exit_code == 0


def test_show_json_and_hypervisor_override(good):
    result = run("--config", str(good), "--hypervisor", "toy-alias", "config", "show", "--format", "json")
    assert json.loads(result.stdout)["runtime"]["hypervisor_name"] == "toy"


def test_show_refuses_an_invalid_configuration_unless_asked(bad):
    result = run("config", "show", "--config", str(bad))
    assert result.exit_code == 1
    assert "hypervisor.toy.default_vcpus = 0: must be at least 1" in result.stderr
    result = run("config", "show", "--config", str(bad), "--no-validate", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["hypervisor"]["toy"]["default_vcpus"] == 0


def test_validate_ok_prints_warnings(good):
    result = run("config", "validate", "--config", str(good))
    assert result.exit_code == 0
    assert result.stdout == f"configuration OK ({good}, hypervisor toy)\n"
    assert "mystery" in result.stderr


def test_validate_lists_one_line_per_problem(bad):
    result = run("config", "validate", "--config", str(bad))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"invalid configuration {bad}"
    assert lines[1:] == [
        "hypervisor.toy.kernel = '': no guest kernel: set kernel and initrd (or image), "
        "or run `kabuto image build` to build the guest image",
        "hypervisor.toy.default_vcpus = 0: must be at least 1",
        "hypervisor.toy.default_memory = 8: below the minimum of 64 MiB",
    ]


def test_validate_malformed_toml(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("[runtime]\nname = 'a' 'b'\n")
    result = run("config", "validate", "--config", str(file))
    assert result.exit_code == 1
    assert f"malformed TOML in {file}: line 2, column 12" in result.stderr


def test_hypervisors_json_lists_every_plugin(good):
    result = run("--config", str(good), "hypervisors", "--format", "json")
    assert result.exit_code == 0
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert set(entries) == set(registry.registered_names())
    assert entries["toy"]["active"] is True
    assert entries["toy"]["aliases"] == ["toy-alias"]
    assert entries["toy"]["availability"] == {
        "available": True, "reasons": ["nothing needed"], "binary": "/bin/true", "accelerator": "tcg"}
    assert entries["toy"]["capabilities"]["pause"] is True
    assert entries["toy-down"]["availability"]["available"] is False
    assert entries["toy-broken"]["availability"]["reasons"] == ["plugin error: plugin bug"]
    assert entries["cloud-hypervisor"]["aliases"] == ["clh"]
    # as the configuration would have them: QEMU's default virtio-fs blocks snapshots
    qemu = entries["qemu"]["capabilities"]
    assert (qemu["shared_fs"], qemu["snapshot"]) == (["virtio-fs"], False)


def test_hypervisors_table_and_unusable_config(bad):
    result = run("--config", str(bad), "hypervisors")
    assert result.exit_code == 0
    assert "toy-down" in result.stdout and "qemu" in result.stdout
    result = run("hypervisors", "--config", "/nonexistent.toml")
    assert result.exit_code == 0
    assert "configuration not used" in result.stderr


def test_check_ok_and_not(good, tmp_path):
    result = run("check", "--config", str(good))
    assert result.exit_code == 0, result.stdout
    assert "kabuto can run toy on this host" in result.stdout
    assert "networking:\n  tap devices: /dev/net/tun " in result.stdout
    result = run("--hypervisor", "toy-down", "check", "--config", str(good), "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [fact.split(":")[0] for fact in report["networking"]] == ["tap devices", "vhost-net"]
    assert report["ok"] is False
    assert report["availability"]["reasons"][0] == "toy binary not found"


def test_check_reports_an_invalid_configuration(bad):
    result = run("check", "--config", str(bad))
    assert result.exit_code == 1
    assert "configuration is invalid (3 problem(s))" in result.stdout


def test_main_exits_with_the_command_status(bad, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kabuto", "config", "validate", "--config", str(bad)])
    with pytest.raises(SystemExit) as caught:
        cli_main.main()
    assert caught.value.code == 1
