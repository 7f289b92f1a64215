"""OCI annotations: allow-listed keys only, typed values, path globs, refusals named."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import psutil
import pytest

import kabuto.image
from kabuto.config import loader
from kabuto.config.annotations import MAX_ANNOTATION_VALUE, merge_kernel_params
from kabuto.errors import AnnotationError, ConfigError
from kabuto.hypervisor import host, registry, resolve_config
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.plugin import Availability, BasePlugin

K = "io.katacontainers.config.hypervisor."
KB = "io.kabuto.config.hypervisor."
RT = "io.katacontainers.config.runtime."
AG = "io.katacontainers.config.agent."


class ToyPlugin(BasePlugin):
    default_memory_mib = 256
    min_memory_mib = 128
    shared_fs_kinds = ("none", "virtio-fs")

    def capabilities(self) -> Capabilities:
        return Capabilities(jailer=True)

    def availability(self, table):
        return Availability(True)

    def backend(self):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)
    monkeypatch.setattr(host, "host_cpus", lambda: 4)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=8 << 30))
    registry.registered_names()
    monkeypatch.setattr(registry, "_plugins", dict(registry._plugins))
    monkeypatch.setattr(registry, "_aliases", dict(registry._aliases))
    registry.register_hypervisor_plugin("toy", ToyPlugin())
    registry.register_hypervisor_plugin("toy2", ToyPlugin())


@pytest.fixture
def bin_dir(tmp_path):
    """Executables and boot files under one directory the allow-lists can name."""
    directory = tmp_path / "opt"
    directory.mkdir()
    for name in ("vmm", "other-vmm", "jailer", "vmlinuz", "vmlinuz-debug", "initrd.img"):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)
    return directory


def config_file(tmp_path, bin_dir, table: str = "", extra: str = ""):
    file = tmp_path / "configuration.toml"
    file.write_text(textwrap.dedent(f"""\
        [runtime]
        hypervisor_name = "toy"

        [hypervisor.toy]
        kernel = "{bin_dir}/vmlinuz"
        initrd = "{bin_dir}/initrd.img"
        kernel_params = "console=hvc0 quiet agent.log=info"
        """) + textwrap.dedent(table) + textwrap.dedent(extra))
    return file


def refused(excinfo) -> dict[str, str]:
    return {p.key: p.reason for p in excinfo.value.problems}


def test_enabled_keys_apply_with_both_prefixes(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_vcpus", "default_memory"]\n')
    config = resolve_config(file, {K + "default_vcpus": "2", KB + "default_memory": "1Gi"}).config
    assert config.active_hypervisor.default_vcpus == 2.0
    assert config.active_hypervisor.default_memory == 1024


def test_key_not_enabled_is_refused(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_vcpus"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "default_memory": "512"})
    assert refused(caught) == {
        K + "default_memory": "not allowed by hypervisor.toy.enable_annotations ['default_vcpus']"}


def test_nothing_is_enabled_by_default(tmp_path, bin_dir):
    with pytest.raises(AnnotationError, match="not allowed"):
        resolve_config(config_file(tmp_path, bin_dir), {K + "default_vcpus": "2"})


def test_patterns_must_match_the_whole_key(tmp_path, bin_dir):
    """Unlike Kata's unanchored regexes, "path" does not also enable jailer_path."""
    file = config_file(tmp_path, bin_dir, f"""\
        enable_annotations = ["path", "default_.*"]
        valid_jailer_paths = ["{bin_dir}/*"]
        """)
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "jailer_path": f"{bin_dir}/jailer"})
    assert "not allowed" in refused(caught)[K + "jailer_path"]
    config = resolve_config(file, {K + "default_vcpus": "3", K + "default_max_vcpus": "3"}).config
    assert (config.active_hypervisor.default_vcpus, config.active_hypervisor.default_maxvcpus) == (3, 3)


@pytest.mark.parametrize("key", ["enable_annotations", "valid_hypervisor_paths", "kernel_hash", "accel"])
def test_keys_outside_the_annotatable_set_are_refused_even_with_catch_all(tmp_path, bin_dir, key):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = [".*"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + key: "x"})
    assert refused(caught) == {K + key: "not a hypervisor key annotations may set"}


def test_path_annotation_refused_when_allow_list_is_empty(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["kernel"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "kernel": f"{bin_dir}/vmlinuz-debug"})
    assert refused(caught)[K + "kernel"] == (
        "paths from annotations need hypervisor.toy.valid_kernel_paths, which is empty")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("/etc/shadow", "does not match"),
        ("{bin}/../../etc/passwd", "does not match"),
        ("vmlinuz", "must be an absolute path"),
    ],
)
def test_path_annotation_must_match_the_globs(tmp_path, bin_dir, value, reason):
    file = config_file(tmp_path, bin_dir, f"""\
        enable_annotations = ["kernel", "path"]
        valid_kernel_paths = ["{bin_dir}/vmlinuz*"]
        """)
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "kernel": value.format(bin=bin_dir)})
    assert reason in refused(caught)[K + "kernel"]


def test_path_annotation_within_the_globs_applies(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, f"""\
        enable_annotations = ["kernel", "jailer_path"]
        valid_kernel_paths = ["{bin_dir}/vmlinuz*"]
        valid_jailer_paths = ["{bin_dir}/jailer"]
        """)
    annotations = {K + "kernel": f"{bin_dir}/./vmlinuz-debug", K + "jailer_path": f"{bin_dir}/jailer"}
    config = resolve_config(file, annotations).config
    assert config.active_hypervisor.kernel == f"{bin_dir}/vmlinuz-debug"
    assert config.active_hypervisor.jailer_path == f"{bin_dir}/jailer"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("enable_iothreads", "true", True),
        ("disable_vhost_net", "false", False),
        ("memory_slots", "12", 12),
        ("default_vcpus", "1.5", 1.5),
        ("default_memory", "512", 512),
        ("default_memory", "2G", 1907),
        ("default_memory", "384MiB", 384),
        ("machine_type", " q35 ", "q35"),
        ("virtio_fs_extra_args", "-o,announce_submounts", ["--base", "-o", "announce_submounts"]),
        ("kernel_params", "quiet=0 agent.log=debug", "console=hvc0 quiet=0 agent.log=debug"),
    ],
)
def test_values_are_converted_to_the_field_type(tmp_path, bin_dir, key, value, expected):
    table = f'enable_annotations = ["{key}"]\nvirtio_fs_extra_args = ["--base"]\n'
    file = config_file(tmp_path, bin_dir, table)
    config = resolve_config(file, {K + key: value}).config
    assert getattr(config.active_hypervisor, key) == expected


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("enable_iothreads", "yes", "must be true or false"),
        ("memory_slots", "-1", "must be a non-negative integer"),
        ("memory_slots", "1e3", "must be a non-negative integer"),
        ("default_vcpus", "inf", "must be a finite, non-negative number"),
        ("default_vcpus", "two", "must be a number"),
        ("default_memory", "lots", "must be a size such as 2048, 512Mi or 2Gi"),
        ("pcie_root_port", "17", "at most 16"),
    ],
)
def test_bad_values_are_refused(tmp_path, bin_dir, key, value, reason):
    file = config_file(tmp_path, bin_dir, f'enable_annotations = ["{key}"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + key: value})
    assert refused(caught) == {K + key: reason}


def test_value_that_fails_validation_names_the_annotation(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_memory", "default_vcpus"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "default_memory": "16", K + "default_vcpus": "9"})
    reasons = refused(caught)
    assert reasons["hypervisor.toy.default_memory"] == (
        f"below the minimum of 128 MiB (set by annotation {K}default_memory)")
    assert "set by annotation" in reasons["hypervisor.toy.default_vcpus"]


def test_every_refusal_is_listed_and_other_prefixes_are_ignored(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_vcpus"]\n')
    annotations = {
        K + "default_memory": "512",
        K + "path": "/usr/bin/qemu-system-x86_64",
        "io.kubernetes.cri.container-type": "sandbox",
        "io.katacontainers.pkg.oci.bundle_path": "/run/bundle",
        "io.katacontainers.config_x.hypervisor.path": "/x",
    }
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, annotations)
    assert set(refused(caught)) == {K + "default_memory", K + "path"}
    config = resolve_config(file, {k: v for k, v in annotations.items() if not k.startswith(K)}).config
    assert config.active_hypervisor.default_vcpus == 1


def test_oversized_and_non_string_values_are_refused(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["kernel_params"]\n')
    with pytest.raises(AnnotationError) as caught:
        resolve_config(file, {K + "kernel_params": "a" * (MAX_ANNOTATION_VALUE + 1),
                              RT + "enable_pprof": True})
    assert refused(caught) == {
        K + "kernel_params": f"the value is longer than {MAX_ANNOTATION_VALUE} characters",
        RT + "enable_pprof": "the value must be a string",
    }


def test_invalid_enable_annotations_regex_is_a_config_error(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_(vcpus"]\n')
    with pytest.raises(ConfigError) as caught:
        resolve_config(file, {K + "default_vcpus": "2"})
    assert not isinstance(caught.value, AnnotationError)
    assert caught.value.problems[0].key == "hypervisor.toy.enable_annotations"


def test_runtime_hypervisor_switch_only_to_a_configured_table(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, 'enable_annotations = ["default_vcpus"]\n', f"""\
        [hypervisor.toy2]
        kernel = "{bin_dir}/vmlinuz"
        initrd = "{bin_dir}/initrd.img"
        enable_annotations = ["default_memory"]
        """)
    config = resolve_config(file, {RT + "hypervisor_name": "toy2", K + "default_memory": "300"}).config
    assert config.hypervisor_name == "toy2"
    assert config.active_hypervisor.default_memory == 300  # the switched-to table's rules apply
    with pytest.raises(AnnotationError, match=r"no \[hypervisor.qemu\] table"):
        resolve_config(file, {RT + "hypervisor_name": "qemu"})


def test_runtime_and_agent_annotations(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, "", '[agent.kata]\nkernel_modules = ["a"]\n')
    config = resolve_config(file, {
        AG + "kernel_modules": "b p=1; c",
        AG + "enable_tracing": "true",
        RT + "create_container_timeout": "90",
        RT + "experimental": "x,y",
        RT + "disable_guest_seccomp": "false",
    }).config
    agent = config.active_agent
    assert agent.kernel_modules == ["a", "b p=1", "c"]
    assert agent.enable_tracing is True
    assert (config.runtime.create_container_timeout, agent.request_timeout_ms) == (90, 90000)
    assert config.runtime.experimental == ["x", "y"]
    assert config.runtime.disable_guest_seccomp is False


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (RT + "sandbox_bind_mounts", "/etc", "not a runtime key annotations may set"),
        (RT + "create_container_timeout", "999999", "must be from 1 to 3600 seconds"),
        (AG + "policy", "allow-all", "not an agent key annotations may set"),
        (RT + "internetworking_model", "bridged", "must be one of"),
    ],
)
def test_runtime_and_agent_refusals(tmp_path, bin_dir, key, value, reason):
    with pytest.raises(AnnotationError) as caught:
        resolve_config(config_file(tmp_path, bin_dir), {key: value})
    assert [reason in r for r in refused(caught).values()] == [True]


def test_merge_kernel_params():
    assert merge_kernel_params("a=1 b c=3", "a=2 b") == "c=3 a=2 b"
    assert merge_kernel_params("", "x") == "x"


def test_agent_switch_applies_before_agent_keys(tmp_path, bin_dir):
    file = config_file(tmp_path, bin_dir, "", "[agent.kata]\n[agent.other]\n")
    config = resolve_config(file, {AG + "enable_tracing": "true", RT + "agent_name": "other"}).config
    assert config.runtime.agent_name == "other"
    assert (config.agent["other"].enable_tracing, config.agent["kata"].enable_tracing) == (True, False)
    with pytest.raises(AnnotationError, match=r"no \[agent.nobody\] table"):
        resolve_config(file, {RT + "agent_name": "nobody"})
