"""Plugin registry and factory: built-ins, aliases, unknown names, entry-point plugins."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import kabuto.image
from kabuto.cli.main import cli
from kabuto.config import loader
from kabuto.config.model import HypervisorConfig, KabutoConfig
from kabuto.errors import ConfigError, HypervisorError
from kabuto.hypervisor import Hypervisor, new_hypervisor, registry, resolve, resolve_config
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.plugin import Availability, BasePlugin

PLUGIN_PKG = Path(__file__).resolve().parent.parent / "plugin_pkg"


def _stub(*args, **kwargs):
    raise NotImplementedError


# A backend class with every abstract operation stubbed: enough for the factory to build.
_STUBS = {name: _stub for name in Hypervisor.__abstractmethods__}
StubHypervisor = type("StubHypervisor", (Hypervisor,), _STUBS | {"name": "stub"})


class StubPlugin(BasePlugin):
    aliases = ("stub-alias", "sa")

    def __init__(self, backend_class: object = StubHypervisor) -> None:
        self.backend_class = backend_class

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def availability(self, table):
        return Availability(True)

    def backend(self):
        return self.backend_class


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)
    registry.registered_names()
    monkeypatch.setattr(registry, "_plugins", dict(registry._plugins))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    monkeypatch.setattr(registry, "_load_errors", list(registry._load_errors))


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that has not loaded anything yet (restored after the test)."""
    monkeypatch.setattr(registry, "_plugins", {})
    monkeypatch.setattr(registry, "_aliases", {})
    monkeypatch.setattr(registry, "_load_errors", [])
    monkeypatch.setattr(registry, "_loaded", False)


def test_builtins_and_their_aliases():
    names = registry.registered_names()
    assert {"qemu", "cloud-hypervisor", "firecracker", "dragonball"} <= set(names)
    assert registry.canonical_name("clh") == "cloud-hypervisor"
    assert registry.canonical_name("fc") == "firecracker"
    assert registry.get_plugin("clh") is registry.get_plugin("cloud-hypervisor")
    assert "clh" in registry.aliases_of("cloud-hypervisor")


def test_unknown_name_lists_registered_ones():
    with pytest.raises(ConfigError) as caught:
        registry.get_plugin("vmware")
    message = str(caught.value)
    assert message.startswith("unknown hypervisor 'vmware'; registered: ")
    assert "cloud-hypervisor, dragonball, firecracker" in message


def test_register_checks_the_protocol_and_later_wins():
    with pytest.raises(TypeError, match="does not implement HypervisorPlugin"):
        registry.register_hypervisor_plugin("bad", object())  # type: ignore[arg-type]
    first, second = StubPlugin(), StubPlugin()
    registry.register_hypervisor_plugin("stub", first)
    registry.register_hypervisor_plugin("stub", second)
    assert registry.get_plugin("sa") is second
    registry.unregister_hypervisor_plugin("stub")
    assert "stub" not in registry.registered_names()
    assert registry.canonical_name("sa") == "sa"


def test_factory_builds_the_named_backend(tmp_path):
    registry.register_hypervisor_plugin("stub", StubPlugin())
    table = HypervisorConfig(default_memory=300)
    config = KabutoConfig(runtime={"hypervisor_name": "stub-alias"}, hypervisor={"stub": table})
    backend = new_hypervisor(resolve(config, validate=False), jailer_root=tmp_path)
    assert isinstance(backend, StubHypervisor)
    assert backend.config is table
    assert backend.jailer_root == tmp_path


def test_factory_errors():
    registry.register_hypervisor_plugin("stub", StubPlugin())
    with pytest.raises(ConfigError, match=r"no \[hypervisor.stub\] table"):
        resolve(KabutoConfig(runtime={"hypervisor_name": "stub"}))
    with pytest.raises(ConfigError, match=r"unknown hypervisor 'nope'; registered: .*qemu"):
        resolve(KabutoConfig(runtime={"hypervisor_name": "nope"}))
    registry.register_hypervisor_plugin("stub", StubPlugin(backend_class=dict))
    config = KabutoConfig(runtime={"hypervisor_name": "stub"}, hypervisor={"stub": HypervisorConfig()})
    with pytest.raises(HypervisorError, match="not a Hypervisor"):
        new_hypervisor(resolve(config, validate=False))


def test_broken_builtin_only_warns(fresh_registry, monkeypatch, caplog):
    monkeypatch.setattr(registry, "_BUILTIN", {**registry._BUILTIN, "ghost": "kabuto.hypervisor.no_such_vmm"})
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        names = registry.registered_names()
    assert "ghost" not in names and "qemu" in names
    assert any("'ghost' failed to load" in w for w in registry.load_warnings())
    assert "ghost" in caplog.text


def _dist_info(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def test_failing_entry_point_only_warns(fresh_registry, monkeypatch, tmp_path, caplog):
    site = tmp_path / "site"
    _dist_info(site, "broken_plugin", """\
        [kabuto.hypervisors]
        brokenvmm = kabuto_no_such_module:plugin
        notaplugin = json:dumps
        """)
    monkeypatch.syspath_prepend(str(site))
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        names = registry.registered_names()
    assert "qemu" in names and "brokenvmm" not in names and "notaplugin" not in names
    warnings = registry.load_warnings()
    assert any("'brokenvmm' from kabuto_no_such_module:plugin failed to load" in w for w in warnings)
    assert any("'notaplugin'" in w and "does not implement HypervisorPlugin" in w for w in warnings)
    config = resolve_config(validate=False).config
    assert any("brokenvmm" in w for w in config.warnings)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """tests/plugin_pkg pip-installed (offline, from a copy so the source tree stays clean)."""
    root = tmp_path_factory.mktemp("plugin")
    source = shutil.copytree(PLUGIN_PKG, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, timeout=180,
    )
    return target


@pytest.fixture
def toyvmm(installed_plugin, fresh_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    yield
    for module in [m for m in sys.modules if m.split(".")[0] == "kabuto_toyvmm"]:
        del sys.modules[module]


def test_entry_point_plugin_is_registered_configured_and_built(toyvmm, tmp_path):
    assert "toyvmm" in registry.registered_names()
    assert registry.canonical_name("toy-vmm") == "toyvmm"
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_text("k")
    initrd.write_text("i")
    file = tmp_path / "configuration.toml"
    file.write_text(f'[runtime]\nhypervisor_name = "toy-vmm"\n'
                    f'[hypervisor.toyvmm]\nkernel = "{kernel}"\ninitrd = "{initrd}"\n')
    resolved = resolve_config(file)
    assert resolved.name == "toyvmm"
    assert resolved.table.default_memory == 128  # the plugin's own adjust ran
    backend = new_hypervisor(resolved, jailer_root=tmp_path)
    assert backend.plugin is resolved.plugin  # handed its plugin, not looked up again
    assert type(backend).__module__ == "kabuto_toyvmm"
    file.write_text(file.read_text() + 'machine_type = "q35"\n')
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    assert [p.key for p in caught.value.problems] == ["hypervisor.toyvmm.machine_type"]


def test_entry_point_plugin_is_listed_by_the_cli(toyvmm):
    result = CliRunner().invoke(cli, ["hypervisors", "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert entries["toyvmm"]["aliases"] == ["toy-vmm"]
    assert entries["toyvmm"]["availability"]["available"] is True
    assert entries["toyvmm"]["capabilities"]["notes"] == ["a toy: boots nothing"]
