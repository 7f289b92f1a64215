"""Template mode's host side without a VM: the content key, settings, refusals, damage checks."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from kabuto.errors import ConfigError
from kabuto.hypervisor import resolve_config
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.qemu.plugin import CAPABILITIES
from kabuto.runtime import factory
from kabuto.runtime.factory import source, template

DEFAULT = files("kabuto.config").joinpath("default.toml").read_text()


def config(tmp_path: Path, extra: str = "", shared_fs: str = "virtio-9p", enable: bool = True) -> Path:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    if not kernel.exists():
        kernel.write_bytes(b"kernel one")
        initrd.write_bytes(b"initrd")
    path = tmp_path / "configuration.toml"
    path.write_text(DEFAULT)
    dropins = tmp_path / "config.d"
    dropins.mkdir(exist_ok=True)
    (dropins / "50-template.toml").write_text(
        f'[hypervisor.qemu]\nshared_fs = "{shared_fs}"\nkernel = "{kernel}"\ninitrd = "{initrd}"\n'
        f'[hypervisor.qemu.factory]\nenable_template = {str(enable).lower()}\n'
        f'template_path = "{tmp_path / "templates"}"\n'
        + extra)
    return path


def key_of(path: Path, annotations: dict[str, str] | None = None) -> str:
    resolved = resolve_config(str(path), annotations)
    root = Path(resolved.table.factory.template_path)
    root.mkdir(exist_ok=True)
    return template._inputs(resolved, root)[0]


def test_the_key_follows_the_vm_size_and_the_kernel_bytes(tmp_path: Path) -> None:
    path = config(tmp_path)
    first = key_of(path)
    assert key_of(path) == first
    (tmp_path / "config.d" / "60-size.toml").write_text("[hypervisor.qemu]\ndefault_memory = 256\n")
    assert key_of(path) != first
    (tmp_path / "config.d" / "60-size.toml").unlink()
    (tmp_path / "vmlinuz").write_bytes(b"kernel two")
    assert key_of(path) != first


def test_the_digest_cache_hashes_a_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "blob"
    file.write_bytes(b"x" * 10)
    cache = source.DigestCache(tmp_path / "digests.json")
    digest = cache.digest(str(file))
    cache.save()
    again = source.DigestCache(tmp_path / "digests.json")
    monkeypatch.setattr(source.hashlib, "sha256", lambda: pytest.fail("hashed again"))
    assert again.digest(str(file)) == digest


def test_differences_name_what_changed() -> None:
    made = {"hypervisor": "qemu", "table": {"default_memory": 512, "kernel": "/k"},
            "files": {"kernel": "a"}, "guest_code": "g"}
    wanted = {"hypervisor": "qemu", "table": {"default_memory": 256, "kernel": "/k"},
              "files": {"kernel": "b"}, "guest_code": "h"}
    assert source.differences(made, wanted) == ["kernel", "default_memory", "Kabuto's guest code"]


def test_the_hypervisor_table_wins_over_the_go_runtime_factory_table(tmp_path: Path) -> None:
    resolved = resolve_config(str(config(tmp_path, '[factory]\ntemplate_path = "/elsewhere"\n')))
    settings = template.template_settings(resolved.config, resolved.name, resolved.table)
    assert settings.enabled and settings.path == tmp_path / "templates"
    assert isinstance(factory.warm_source(resolved), template.TemplateSource)


def test_template_mode_off_means_no_warm_source(tmp_path: Path) -> None:
    assert factory.warm_source(resolve_config(str(config(tmp_path, enable=False)))) is None


def test_templates_with_virtio_fs_are_refused_naming_both_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_config(str(config(tmp_path, "[factory]\nenable_template = true\n", shared_fs="virtio-fs")))
    message = str(error.value)
    assert "hypervisor.qemu.factory.enable_template" in message and "factory.enable_template" in message
    assert "shared_fs" in message and "virtio-9p" in message


async def test_init_refuses_when_template_mode_is_off(tmp_path: Path) -> None:
    with pytest.raises(source.FactoryError, match="enable_template = true"):
        await template.init_template(resolve_config(str(config(tmp_path, enable=False))), tmp_path / "vm")


def test_too_little_room_is_refused_before_anything_boots(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class Full:
        f_bavail, f_frsize = 10, 2**20

    monkeypatch.setattr(template.os, "statvfs", lambda path: Full())
    with pytest.raises(source.FactoryError, match="10 MiB free, a template needs 544 MiB"):
        template._check_room(tmp_path, 512)


def test_a_cut_short_or_missing_template_is_damaged(tmp_path: Path) -> None:
    directory = tmp_path / "key"
    directory.mkdir()
    (directory / template.RECORD_FILE).write_text(json.dumps({"memory_mib": 1}))
    found = template.list_templates(tmp_path)
    assert [t.key for t in found] == ["key"]
    assert "No such file" in found[0].problem()
    (directory / template.MEMORY_FILE).write_bytes(b"\0" * 4096)
    (directory / template.STATE_FILE).write_bytes(b"state")
    assert "cut short" in found[0].problem()
    with open(directory / template.MEMORY_FILE, "r+b") as memory:
        memory.truncate(2**20)
    assert found[0].problem() == ""


def test_only_qemu_declares_templates() -> None:
    assert CAPABILITIES.template
    assert Capabilities.from_dict(CAPABILITIES.to_dict()).template
    assert not Capabilities().template
