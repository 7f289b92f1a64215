"""The coverage registry: every key is applied (and read where it says), warned or refused; the
loader warns and refuses by it, annotations included; docs/configuration.md shows its table."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import kabuto
import kabuto.image
from kabuto.config import annotations, coverage, keys, load_config, loader
from kabuto.config.keys import REGISTRY, WARNED, Applied, Refused
from kabuto.config.model import AgentConfig, HypervisorConfig, RuntimeConfig
from kabuto.config.rules import common_problems
from kabuto.errors import AnnotationError, ConfigError
from kabuto.hypervisor import devices, registry
from kabuto.hypervisor.resolve import resolve, resolve_config

SRC = Path(kabuto.__file__).parent
DOC = SRC.parents[1] / "docs" / "configuration.md"
K = "io.katacontainers.config.hypervisor."
NOT_APPLIED = "parsed, not applied by Kabuto"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: None, raising=False)


def load(tmp_path, text: str, annotations: dict[str, str] | None = None):
    file = tmp_path / "configuration.toml"
    file.write_text(textwrap.dedent(text))
    return load_config(file, annotations)


def unapplied(config) -> list[str]:
    return [w for w in config.warnings if "parsed, not applied" in w]


# -- the registry itself -------------------------------------------------------------------

def test_every_model_field_is_classified_and_nothing_else():
    fields = list(keys.model_keys())
    assert sorted(set(fields) - set(REGISTRY)) == [], "classify the new fields in kabuto/config/keys.py"
    assert sorted(set(REGISTRY) - set(fields)) == [], "the registry names fields the models do not have"


def test_every_entry_is_one_of_the_three():
    for key, entry in REGISTRY.items():
        assert entry is WARNED or isinstance(entry, Applied | Refused), key


@pytest.mark.parametrize("key", [k for k, e in REGISTRY.items() if isinstance(e, Applied)])
def test_an_applied_key_is_read_where_the_registry_says(key):
    entry = REGISTRY[key]
    assert entry.reads, f"{key}: name the modules that read it"
    name = key.rsplit(".", 1)[-1]
    # an attribute read, or the key as a string (the valid_*_paths table, getattr)
    read = re.compile(rf"\.{name}\b|[\"']{name}[\"']")
    for module in entry.reads:
        text = (SRC / module).read_text()
        assert read.search(text), f"{key}: {module} does not read it"
    # a key "applied" only inside config/ is a rule on data, not a no-op: only the rules may claim it
    if all(module.startswith("config/") for module in entry.reads):
        assert key == "hypervisor.enable_annotations" or "valid_" in key, key


def test_backends_named_are_the_built_in_ones():
    builtin = {name for name in registry.registered_names() if name in keys.BUILTIN_BACKENDS}
    assert builtin == keys.BUILTIN_BACKENDS
    for key, entry in REGISTRY.items():
        if isinstance(entry, Applied) and entry.backends is not None:
            assert entry.backends <= keys.BUILTIN_BACKENDS, key


def test_every_annotation_targets_a_classified_key():
    targets = [f"hypervisor.{key}" for key in annotations._HYPERVISOR_KEYS.values()]
    targets += [f"agent.{key}" for key in annotations._AGENT_KEYS]
    targets += [f"runtime.{key}" for key in annotations._RUNTIME_KEYS]
    assert [t for t in targets if t not in REGISTRY] == []


def test_the_issue_keys_are_not_claimed_applied():
    for key in ("hypervisor.rx_rate_limiter_max_rate",
                "hypervisor.tx_rate_limiter_max_rate", "hypervisor.disk_rate_limiter_bw_max_rate",
                "runtime.enable_tracing", "runtime.jaeger_endpoint",
                "runtime.enable_vcpus_pinning", "agent.kernel_modules"):
        assert REGISTRY[key] is WARNED, key


def test_the_doc_shows_the_generated_table():
    assert coverage.table_in(DOC.read_text()) == coverage.render_markdown(), (
        "run: python -m kabuto.config.coverage --write docs/configuration.md")


# -- warnings ------------------------------------------------------------------------------

def test_the_built_in_default_warns_about_nothing():
    assert load_config().warnings == []


def test_a_set_key_kabuto_does_not_apply_warns_once_and_a_default_value_does_not(tmp_path):
    config = load(tmp_path, """\
        [hypervisor.qemu]
        memory_offset = 12
        network_queues = 0
        indep_iothreads = 0
        queue_size = 128
        [agent.kata]
        kernel_modules = ["e1000e"]
        [runtime]
        enable_tracing = true
        jaeger_password = "hunter2"
        """)
    assert unapplied(config) == [
        f"hypervisor.qemu.memory_offset = 12: {NOT_APPLIED}",
        "hypervisor.qemu.queue_size = 128: parsed, not applied by the qemu backend (only cloud-hypervisor)",
        f'agent.kata.kernel_modules = ["e1000e"]: {NOT_APPLIED}',
        f"runtime.enable_tracing = true: {NOT_APPLIED}",
        f"runtime.jaeger_password = (set, not shown): {NOT_APPLIED}",
    ]


def test_a_switched_key_is_a_warned_one_whose_switch_is_in_its_table():
    for key, switch in keys.SWITCHED_BY.items():
        assert REGISTRY[key] is WARNED, key
        table = key.rsplit(".", 1)[0]
        assert f"{table}.{switch}" in REGISTRY, key


def test_a_key_tuning_a_feature_that_is_off_is_quiet_and_warns_once_it_is_on(tmp_path):
    text = """\
        [hypervisor.qemu]
        guest_swap_path = "/run/swap"
        [agent.kata.mem_agent]
        mem_agent_enable = {enable}
        memcg_swappiness_max = 40
        """
    assert unapplied(load(tmp_path, text.format(enable="false"))) == []
    assert unapplied(load(tmp_path, text.format(enable="true"))) == [
        f"agent.kata.mem_agent.mem_agent_enable = true: {NOT_APPLIED}",
        f"agent.kata.mem_agent.memcg_swappiness_max = 40: {NOT_APPLIED}",
    ]


def test_a_key_only_some_backends_apply_warns_under_the_others(tmp_path):
    text = """\
        [runtime]
        hypervisor_name = "{name}"
        [hypervisor.{name}]
        firmware = "/opt/OVMF.fd"
        disable_seccomp = true
        """
    assert unapplied(load(tmp_path, text.format(name="qemu"))) == [
        "hypervisor.qemu.disable_seccomp = true: parsed, not applied by the qemu backend "
        "(only cloud-hypervisor, firecracker)"]
    assert unapplied(load(tmp_path, text.format(name="firecracker"))) == [
        'hypervisor.firecracker.firmware = "/opt/OVMF.fd": parsed, not applied by the firecracker backend '
        "(only cloud-hypervisor, dragonball, qemu)"]


def test_tables_kabuto_does_not_use_are_not_checked(tmp_path):
    config = load(tmp_path, """\
        [hypervisor.qemu]
        [hypervisor.firecracker]
        memory_slots = 12
        rootless = true
        [agent.kata]
        [agent.other]
        policy = "package agent_policy"
        """)
    assert unapplied(config) == []
    assert common_problems(config) == []


def test_an_annotation_for_a_key_kabuto_does_not_apply_warns_naming_it(tmp_path):
    config = load(tmp_path, """\
        [hypervisor.qemu]
        enable_annotations = ["enable_mem_prealloc", "enable_virtio_mem"]
        """, {K + "enable_mem_prealloc": "true", K + "enable_virtio_mem": "false",
              "io.katacontainers.config.runtime.enable_vcpus_pinning": "true"})
    assert unapplied(config) == [
        f"hypervisor.qemu.enable_mem_prealloc = true: {NOT_APPLIED} "
        f"(set by annotation {K}enable_mem_prealloc)",
        # the default value, but asked for explicitly
        f"hypervisor.qemu.enable_virtio_mem = false: {NOT_APPLIED} (set by annotation {K}enable_virtio_mem)",
        f"runtime.enable_vcpus_pinning = true: {NOT_APPLIED} "
        "(set by annotation io.katacontainers.config.runtime.enable_vcpus_pinning)",
    ]


# -- refusals ------------------------------------------------------------------------------

def test_a_refused_key_set_in_a_file_is_a_problem_naming_it(tmp_path):
    config = load(tmp_path, """\
        [hypervisor.qemu]
        rootless = true
        confidential_guest = true
        disable_guest_selinux = true
        [agent.kata]
        policy = "package agent_policy"
        """)
    problems = {p.key: p.reason for p in common_problems(config)}
    assert set(problems) == {"hypervisor.qemu.rootless", "hypervisor.qemu.confidential_guest",
                             "agent.kata.policy"}
    assert all(reason.startswith("not supported by Kabuto: ") for reason in problems.values())


def test_a_refused_key_set_by_an_annotation_is_refused_by_name(tmp_path):
    text = """\
        [hypervisor.qemu]
        enable_annotations = ["rootless"]
        """
    with pytest.raises(AnnotationError) as caught:
        load(tmp_path, text, {K + "rootless": "true"})
    [problem] = caught.value.problems
    assert (problem.key, problem.value) == (K + "rootless", "true")
    assert problem.reason.startswith("not supported by Kabuto: ")
    # its default is harmless
    assert load(tmp_path, text, {K + "rootless": "false"}).active_hypervisor.rootless is False


def test_refusal_compares_with_the_model_default():
    assert keys.refusal("hypervisor", "rootless", False, HypervisorConfig) is None
    assert keys.refusal("hypervisor", "rootless", True, HypervisorConfig)
    assert keys.refusal("agent", "kernel_modules", ["x"], AgentConfig) is None
    assert keys.refusal("runtime", "enable_pprof", True, RuntimeConfig) is None


# -- Kata's stock Firecracker timeouts -----------------------------------------------------

def test_dial_timeout_alone_raises_reconnect_timeout_with_a_warning(tmp_path):
    config = load(tmp_path, """\
        [hypervisor.firecracker]
        [runtime]
        hypervisor_name = "firecracker"
        [agent.kata]
        dial_timeout_ms = 45000
        """)
    agent = config.agent["kata"]
    assert (agent.dial_timeout_ms, agent.reconnect_timeout_ms) == (45000, 45000)
    assert ("agent.kata.dial_timeout_ms = 45000 without agent.kata.reconnect_timeout_ms: "
            "reconnect_timeout_ms raised from 3000 to 45000") in config.warnings
    assert common_problems(config) == []


def test_both_timeouts_set_inconsistently_are_refused_naming_both(tmp_path):
    config = load(tmp_path, """\
        [agent.kata]
        dial_timeout_ms = 45000
        reconnect_timeout_ms = 3000
        """)
    assert config.agent["kata"].reconnect_timeout_ms == 3000
    [problem] = common_problems(config)
    assert problem.key == "agent.kata.reconnect_timeout_ms"
    assert "agent.kata.dial_timeout_ms (45000)" in problem.reason


def test_a_zero_request_timeout_is_refused(tmp_path):
    config = load(tmp_path, """\
        [agent.kata]
        request_timeout_ms = 0
        """)
    [problem] = common_problems(config)
    assert (problem.key, problem.reason) == ("agent.kata.request_timeout_ms", "must be positive")


def test_agent_enable_debug_sets_the_agent_log_level_on_the_kernel_command_line(tmp_path):
    file = tmp_path / "configuration.toml"
    file.write_text(textwrap.dedent("""\
        [hypervisor.qemu]
        kernel_params = "quiet=0"
        [agent.kata]
        enable_debug = true
        """))
    table = resolve_config(file, validate=False).table
    assert table.kernel_params == "quiet=0 agent_log_level=DEBUG"
    config = load_config(file)
    resolve(config, validate=False)
    assert resolve(config, validate=False).table.kernel_params.count("agent_log_level") == 1
    assert "agent_log_level" not in resolve_config(None, validate=False).table.kernel_params


def test_agent_server_port_reaches_the_guest_kernel_command_line(tmp_path):
    file = tmp_path / "configuration.toml"
    text = """\
        [hypervisor.qemu]
        kernel_params = "{params}"
        [agent.kata]
        server_port = {port}
        """
    file.write_text(textwrap.dedent(text.format(params="quiet", port=2049)))
    table = resolve_config(file, validate=False).table
    assert table.kernel_params == "quiet agent_vsock_port=2049"
    # the hybrid-vsock backends (cloud-hypervisor, firecracker, dragonball) dial it too
    channel = devices.hybrid_vsock_agent_channel(tmp_path / "vsock.sock", table.kernel_params)
    assert channel.url() == f"hvsock://{tmp_path / 'vsock.sock'}:2049"
    # Kata's 1024 is what the agent serves without the word
    file.write_text(textwrap.dedent(text.format(params="quiet", port=1024)))
    assert resolve_config(file, validate=False).table.kernel_params == "quiet"
    # written both ways alike: kept once
    file.write_text(textwrap.dedent(text.format(params="agent_vsock_port=2049", port=2049)))
    assert resolve_config(file, validate=False).table.kernel_params == "agent_vsock_port=2049"


@pytest.mark.parametrize(("params", "port", "key", "reason"), [
    ("agent_vsock_port=3000", 2049, "hypervisor.qemu.kernel_params",
     "agent_vsock_port=3000 contradicts agent.kata.server_port (2049): set the port there only"),
    ("agent_vsock_port=x", 1024, "hypervisor.qemu.kernel_params",
     "agent_vsock_port=x contradicts agent.kata.server_port (1024): set the port there only"),
    ("", 0, "agent.kata.server_port", "must be a vsock port from 1 to 4294967294"),
    ("", 0xFFFFFFFF, "agent.kata.server_port", "must be a vsock port from 1 to 4294967294"),
])
def test_a_bad_or_contradicted_server_port_is_refused_by_name(tmp_path, params, port, key, reason):
    file = tmp_path / "configuration.toml"
    file.write_text(f'[hypervisor.qemu]\nkernel_params = "{params}"\n[agent.kata]\nserver_port = {port}\n')
    with pytest.raises(ConfigError) as caught:
        resolve_config(file)
    found = [(p.key, p.reason) for p in caught.value.problems
             if "server_port" in p.key or "vsock" in p.reason]
    assert found == [(key, reason)]


def test_kata_s_agent_create_container_timeout_bounds_create_container(tmp_path):
    config = load(tmp_path, "[agent.kata]\ncreate_container_timeout = 120\n")
    assert config.runtime.create_container_timeout == 120
    assert unapplied(config) == []
    # Kabuto's own [runtime] key alone
    assert load(tmp_path, "[runtime]\ncreate_container_timeout = 90\n").runtime.create_container_timeout == 90


def test_both_create_container_timeouts_set_differently_are_refused_naming_both(tmp_path):
    config = load(tmp_path, """\
        [agent.kata]
        create_container_timeout = 120
        [runtime]
        create_container_timeout = 90
        """)
    problems = {p.key: p.reason for p in common_problems(config)}
    assert problems == {"agent.kata.create_container_timeout":
                        "differs from runtime.create_container_timeout (90), the bound of CreateContainer: "
                        "set one of them"}
