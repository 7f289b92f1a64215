"""load_config: search order, drop-ins, TOML errors, strict types, unknown keys, hypervisor names."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import kabuto.image
from kabuto.config import loader
from kabuto.config.model import KabutoConfig
from kabuto.errors import ConfigError
from kabuto.hypervisor import registry, resolve_config
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.plugin import Availability, BasePlugin


class ToyPlugin(BasePlugin):
    """A VMM without a binary, so tests need no host tools."""

    aliases = ("toy-alias",)
    default_memory_mib = 256
    block_drivers = ("virtio-blk-pci", "virtio-scsi")
    shared_fs_kinds = ("none", "virtio-9p")

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def availability(self, table):
        return Availability(True, ["always"])

    def backend(self):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No machine state leaks in: no $KABUTO_CONFIG, no /etc file, no built guest image."""
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "etc" / "configuration.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)
    registry.registered_names()  # load the built-ins before taking the copy
    monkeypatch.setattr(registry, "_plugins", dict(registry._plugins))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    registry.register_hypervisor_plugin("toy", ToyPlugin())


@pytest.fixture
def boot_files(tmp_path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return kernel, initrd


def toy_toml(boot_files, extra: str = "") -> str:
    kernel, initrd = boot_files
    return textwrap.dedent(f"""\
        [runtime]
        hypervisor_name = "toy"

        [hypervisor.toy]
        kernel = "{kernel}"
        initrd = "{initrd}"
        """) + textwrap.dedent(extra)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- search order --------------------------------------------------------------------------

def test_explicit_path_wins_over_env_and_system(tmp_path, boot_files, monkeypatch):
    explicit = write(tmp_path / "a" / "c.toml", toy_toml(boot_files, "default_memory = 300\n"))
    env = write(tmp_path / "b" / "c.toml", toy_toml(boot_files, "default_memory = 400\n"))
    write(loader.SYSTEM_PATH, toy_toml(boot_files, "default_memory = 500\n"))
    monkeypatch.setenv(loader.ENV_VAR, str(env))
    config = resolve_config(explicit).config
    assert config.source == str(explicit)
    assert config.active_hypervisor.default_memory == 300


def test_env_var_wins_over_system_path(tmp_path, boot_files, monkeypatch):
    env = write(tmp_path / "b" / "c.toml", toy_toml(boot_files, "default_memory = 400\n"))
    write(loader.SYSTEM_PATH, toy_toml(boot_files, "default_memory = 500\n"))
    monkeypatch.setenv(loader.ENV_VAR, str(env))
    assert resolve_config().config.active_hypervisor.default_memory == 400


def test_system_path_then_builtin(boot_files):
    write(loader.SYSTEM_PATH, toy_toml(boot_files, "default_memory = 500\n"))
    assert resolve_config().config.active_hypervisor.default_memory == 500
    loader.SYSTEM_PATH.unlink()
    config = resolve_config(validate=False).config
    assert config.source == "<built-in default.toml>"
    assert config.hypervisor_name == "qemu"


def test_builtin_default_is_qemu_and_needs_only_the_guest_image():
    with pytest.raises(ConfigError) as caught:
        resolve_config()
    keys = [p.key for p in caught.value.problems]
    assert keys == ["hypervisor.qemu.kernel"]
    assert "kabuto image build" in caught.value.problems[0].reason


def test_builtin_default_uses_the_installed_image(monkeypatch, boot_files):
    kernel, initrd = boot_files
    image = SimpleNamespace(kernel=kernel, initrd=initrd)
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: image, raising=False)
    config = resolve_config().config
    assert config.active_hypervisor.kernel == str(kernel)
    assert config.warnings == []


@pytest.mark.parametrize("origin", ["argument", "env"])
def test_missing_explicit_file_is_an_error(tmp_path, monkeypatch, origin):
    missing = tmp_path / "nope.toml"
    if origin == "env":
        monkeypatch.setenv(loader.ENV_VAR, str(missing))
        with pytest.raises(ConfigError, match=r"nope\.toml \(from \$KABUTO_CONFIG\) does not exist"):
            resolve_config()
    else:
        with pytest.raises(ConfigError, match=r"nope\.toml \(from --config\) does not exist"):
            resolve_config(missing)


# -- drop-ins ------------------------------------------------------------------------------

def test_dropins_merge_in_name_order_deeply(tmp_path, boot_files):
    main = write(tmp_path / "configuration.toml", toy_toml(boot_files, """\
        default_memory = 300
        kernel_params = "a=1"
        enable_annotations = ["default_vcpus", "default_memory"]

        [agent.kata]
        dial_timeout_ms = 20
        kernel_modules = ["x"]
        """))
    write(tmp_path / "config.d" / "20-second.toml", "[hypervisor.toy]\ndefault_memory = 700\n")
    write(tmp_path / "config.d" / "10-first.toml", textwrap.dedent("""\
        [hypervisor.toy]
        default_memory = 600
        enable_annotations = ["kernel_params"]

        [agent.kata]
        kernel_modules = ["y", "z"]
        """))
    write(tmp_path / "config.d" / "README", "not toml at all [")
    config = resolve_config(main).config
    table = config.active_hypervisor
    assert config.dropins == [str(tmp_path / "config.d" / n) for n in ("10-first.toml", "20-second.toml")]
    assert table.default_memory == 700  # the later file wins
    assert table.kernel_params == "a=1"  # untouched keys of a merged table survive
    assert table.enable_annotations == ["kernel_params"]  # arrays are replaced, not appended
    assert config.agent["kata"].dial_timeout_ms == 20
    assert config.agent["kata"].kernel_modules == ["y", "z"]


def test_dropin_may_use_an_alias_for_the_table(tmp_path, boot_files):
    main = write(tmp_path / "configuration.toml", toy_toml(boot_files))
    write(tmp_path / "config.d" / "10.toml", "[hypervisor.toy-alias]\ndefault_memory = 900\n")
    config = resolve_config(main).config
    assert set(config.hypervisor) == {"toy"}
    assert config.active_hypervisor.default_memory == 900


def test_malformed_dropin_names_its_file(tmp_path, boot_files):
    main = write(tmp_path / "configuration.toml", toy_toml(boot_files))
    bad = write(tmp_path / "config.d" / "10.toml", "[hypervisor.toy]\ndefault_memory = = 1\n")
    with pytest.raises(ConfigError, match=rf"{bad}: line 2, column 18"):
        resolve_config(main)


def test_dropin_directory_entry_is_skipped_with_a_warning(tmp_path, boot_files):
    main = write(tmp_path / "configuration.toml", toy_toml(boot_files))
    (tmp_path / "config.d" / "50.toml").mkdir(parents=True)
    config = resolve_config(main).config
    assert any("50.toml is not a regular file" in w for w in config.warnings)


# -- TOML syntax and types -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[runtime]\nhypervisor_name = \"qemu\"\nname = \n", "line 3, column 8"),
        ("[runtime\n", "line 1, column 9"),
        ("a = 1\na = 2\n", "line 2, column 6"),
        ("x = [1,\n", "line 2, column 1"),
    ],
)
def test_malformed_toml_names_file_line_and_column(tmp_path, text, where):
    file = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    assert str(caught.value).startswith(f"malformed TOML in {file}: {where}: ")


def test_invalid_utf8_names_line_and_column(tmp_path):
    file = tmp_path / "c.toml"
    file.write_bytes(b"[runtime]\nname = \"a\xff\"\n")
    with pytest.raises(ConfigError, match=r"line 2, column 10: not valid UTF-8"):
        resolve_config(file)


def test_oversized_file_is_refused(tmp_path):
    file = write(tmp_path / "c.toml", "# " + "x" * loader.MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        resolve_config(file)


def test_wrong_types_give_one_problem_per_key_with_full_paths(tmp_path, boot_files):
    file = write(tmp_path / "c.toml", toy_toml(boot_files, """\
        default_vcpus = "two"
        default_memory = 1.5
        enable_debug = 1
        pflashes = ["/a", 3]

        [agent.kata]
        dial_timeout_ms = true
        """))
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    found = {p.key: p.value for p in caught.value.problems}
    assert found == {
        "hypervisor.toy.default_vcpus": "two",
        "hypervisor.toy.default_memory": 1.5,
        "hypervisor.toy.enable_debug": 1,
        "hypervisor.toy.pflashes[1]": 3,
        "agent.kata.dial_timeout_ms": True,
    }


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("runtime = 5\n", "runtime"),
        ("hypervisor = [1]\n", "hypervisor"),
        ("[hypervisor]\nqemu = \"x\"\n", "hypervisor.qemu"),
        ("[hypervisor.qemu]\ndefault_vcpus = nan\n", "hypervisor.qemu.default_vcpus"),
        ("[hypervisor.qemu]\nkernel = \"a\\u0000b\"\n", "hypervisor.qemu.kernel"),
    ],
)
def test_wrong_shapes_are_config_errors(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        resolve_config(write(tmp_path / "c.toml", text))
    assert [p.key for p in caught.value.problems] == [key]


def test_unknown_keys_are_kept_and_reported(tmp_path, boot_files):
    file = write(tmp_path / "c.toml", toy_toml(boot_files, """\
        future_knob = 3

        [hypervisor.toy.factory]
        enable_template = false
        frobnicate = true

        [hypervisor.remote]
        path = "/x"

        [agent.kata.mem_agent]
        not_a_mem_agent_key = 1

        [whatever]
        a = 1
        """))
    config = resolve_config(file).config
    assert config.active_hypervisor.model_extra == {"future_knob": 3}
    assert config.warnings == [
        "unknown key whatever (kept, not used)",
        "unknown key hypervisor.toy.future_knob (kept, not used)",
        "unknown key hypervisor.toy.factory.frobnicate (kept, not used)",
        "unknown key agent.kata.mem_agent.not_a_mem_agent_key (kept, not used)",
        "[hypervisor.remote]: no plugin registered under that name (kept, not used)",
    ]
    assert config.to_dict()["whatever"] == {"a": 1}


def test_bookkeeping_fields_cannot_be_set_from_toml(tmp_path, boot_files):
    file = write(tmp_path / "c.toml", 'source = "/forged"\n' + toy_toml(boot_files))
    config = resolve_config(file).config
    assert config.source == str(file)
    assert "unknown key source (ignored)" in config.warnings


# -- hypervisor names ----------------------------------------------------------------------

def test_alias_in_runtime_and_table_name(tmp_path, boot_files):
    kernel, initrd = boot_files
    file = write(tmp_path / "c.toml", textwrap.dedent(f"""\
        [runtime]
        hypervisor_name = "toy-alias"
        [hypervisor.toy-alias]
        kernel = "{kernel}"
        initrd = "{initrd}"
        default_memory = 321
        """))
    config = resolve_config(file).config
    assert config.hypervisor_name == "toy"
    assert config.active_hypervisor.default_memory == 321


def test_builtin_aliases_resolve(tmp_path):
    config = resolve_config(write(tmp_path / "c.toml", "[runtime]\nhypervisor_name = \"clh\"\n"
                                                     "[hypervisor.fc]\ndefault_memory = 256\n"),
                         validate=False).config
    assert config.hypervisor_name == "cloud-hypervisor"
    assert set(config.hypervisor) == {"cloud-hypervisor", "firecracker"}


def test_table_and_alias_twice_in_one_file_is_an_error(tmp_path):
    file = write(tmp_path / "c.toml", "[hypervisor.toy]\n[hypervisor.toy-alias]\n")
    with pytest.raises(ConfigError, match="keep one"):
        resolve_config(file)


def test_unknown_hypervisor_lists_registered_names(tmp_path):
    file = write(tmp_path / "c.toml", "[runtime]\nhypervisor_name = \"bochs\"\n")
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    message = str(caught.value)
    assert "unknown hypervisor 'bochs'" in message
    for name in ("qemu", "toy", "cloud-hypervisor", "firecracker", "dragonball"):
        assert name in message


def test_hypervisor_name_argument_overrides_and_creates_a_default_table(tmp_path):
    file = write(tmp_path / "c.toml", "[runtime]\nhypervisor_name = \"qemu\"\n")
    with pytest.raises(ConfigError) as caught:
        resolve_config(file, hypervisor_name="toy-alias")
    assert [p.key for p in caught.value.problems] == ["hypervisor.toy.kernel"]
    config = resolve_config(file, hypervisor_name="toy", validate=False).config
    assert config.hypervisor_name == "toy"
    assert config.active_hypervisor.default_memory == ToyPlugin.default_memory_mib  # adjusted


def test_only_the_active_table_is_validated(tmp_path, boot_files):
    file = write(tmp_path / "c.toml", toy_toml(boot_files, "[hypervisor.firecracker]\ndefault_vcpus = 0\n"))
    assert resolve_config(file).config.hypervisor["firecracker"].default_vcpus == 0


# -- runtime and agent rules ----------------------------------------------------------------

def test_runtime_and_agent_rules(tmp_path, boot_files):
    kernel, initrd = boot_files
    file = write(tmp_path / "c.toml", textwrap.dedent(f"""\
        [runtime]
        hypervisor_name = "toy"
        internetworking_model = "bridged"
        agent_name = "other"
        [hypervisor.toy]
        kernel = "{kernel}"
        initrd = "{initrd}"
        [agent.kata]
        dial_timeout_ms = 100
        reconnect_timeout_ms = 50
        """))
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    assert {p.key for p in caught.value.problems} == {
        "runtime.internetworking_model", "runtime.agent_name", "agent.kata.reconnect_timeout_ms"}


@pytest.mark.parametrize("model", ["macvtap", "l3forwarding"])
def test_internetworking_models_kabuto_does_not_build_are_refused_by_name(tmp_path, boot_files, model):
    file = write(tmp_path / "c.toml", toy_toml(boot_files).replace(
        '[runtime]\n', f'[runtime]\ninternetworking_model = "{model}"\n'))
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    [problem] = caught.value.problems
    assert problem.key == "runtime.internetworking_model" and problem.value == model
    assert problem.reason.startswith("not built in Kabuto") and '"tcfilter"' in problem.reason


def test_to_dict_round_trips_through_the_loader(tmp_path, boot_files):
    import tomli_w

    first = resolve_config(write(tmp_path / "a" / "c.toml",
                                 toy_toml(boot_files, "default_memory = 333\n"))).config
    again = resolve_config(write(tmp_path / "b" / "c.toml", tomli_w.dumps(first.to_dict()))).config
    assert again.to_dict() == first.to_dict()
    assert isinstance(again, KabutoConfig)
