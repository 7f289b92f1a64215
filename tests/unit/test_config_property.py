"""Property: whatever TOML text, structure or annotations come in, only ConfigError comes out."""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kabuto.image
from kabuto.config import loader
from kabuto.config.annotations import AGENT_PREFIXES, HYPERVISOR_PREFIXES, RUNTIME_PREFIXES
from kabuto.config.model import AgentConfig, HypervisorConfig, KabutoConfig, RuntimeConfig
from kabuto.errors import ConfigError
from kabuto.hypervisor import resolve_config

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
HYPERVISOR_NAMES = ["qemu", "clh", "cloud-hypervisor", "fc", "firecracker", "dragonball", "bogus", ""]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    # an "installed image" of existing files, so that some generated tables validate
    image = SimpleNamespace(kernel=Path("/bin/sh"), initrd=Path("/bin/sh"))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: image, raising=False)


# -- strategies ----------------------------------------------------------------------------

texts = st.text(max_size=12)
paths = st.sampled_from(["/bin/sh", "/usr/bin/qemu-system-x86_64", "/dev/urandom", "relative/x", "/no/such",
                         "/tmp", "", "/a\x00b"])
keys = st.text(min_size=1, max_size=8)
scalars = st.one_of(
    st.booleans(), st.integers(), st.floats(), texts, paths, st.datetimes(), st.dates(), st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)


def _typed(annotation: object) -> st.SearchStrategy[object]:
    """Mostly well-typed values, so that generated tables reach the plugins' rules."""
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-5, max_value=1 << 40) | st.integers()
    if annotation is float:
        return st.floats(min_value=-4, max_value=300) | st.floats()
    if annotation is str:
        return paths | texts
    if typing.get_origin(annotation) is list:
        return st.lists(paths | texts | st.sampled_from([".*", "default_.*", "(", "kernel"]), max_size=3)
    return values


def _table(model: type) -> st.SearchStrategy[dict[str, object]]:
    fields = list(model.model_fields)
    entry = st.sampled_from(fields).flatmap(
        lambda key: st.tuples(st.just(key), _typed(model.model_fields[key].annotation) | values))
    return st.lists(entry | st.tuples(keys, values), max_size=8).map(dict)


runtime_tables = _table(RuntimeConfig).flatmap(
    lambda table: st.sampled_from(HYPERVISOR_NAMES).map(lambda name: {**table, "hypervisor_name": name}))
documents = st.fixed_dictionaries(
    {},
    optional={
        "runtime": runtime_tables | values,
        "hypervisor": st.dictionaries(
            st.sampled_from(HYPERVISOR_NAMES) | keys, _table(HypervisorConfig) | values, max_size=2
        ) | values,
        "agent": st.dictionaries(st.just("kata") | keys, _table(AgentConfig) | values, max_size=2) | values,
        "factory": values,
        "extra": values,
    },
)
annotation_keys = st.tuples(
    st.sampled_from([*HYPERVISOR_PREFIXES, *RUNTIME_PREFIXES, *AGENT_PREFIXES, "io.other."]),
    st.sampled_from([*HypervisorConfig.model_fields, *RuntimeConfig.model_fields, "default_max_vcpus"])
    | keys,
).map("".join)
annotation_values = st.text(max_size=12) | paths | st.sampled_from(["true", "2", "1Gi"])
annotations = st.dictionaries(annotation_keys, annotation_values, max_size=4)


LINES = [
    '[runtime]', '[hypervisor.qemu]', 'hypervisor_name = "fc"', 'default_vcpus = 2', 'kernel = "/bin/sh"',
    'a.b.c = 1', '[[x]]', 'y = [1, "a", {b = 2}]', '= 1', 'z = """', '"\\u0000" = 1',
    'default_memory = 1e400',
    "q = 0x7fffffffffffffffff", 'w = 1979-05-27T07:32:00Z', '[hypervisor.clh]', 'initrd = "/bin/sh"',
]


def _load(text: str | bytes, notes: dict[str, str] | None = None,
          hypervisor: str | None = None) -> KabutoConfig | None:
    with tempfile.TemporaryDirectory() as directory:
        file = Path(directory) / "configuration.toml"
        file.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            config = resolve_config(file, notes, hypervisor).config
        except ConfigError:
            return None
    # whatever loads can also be shown, as `kabuto config show` does
    config.to_toml()
    json.dumps(config.to_dict())
    return config


@SETTINGS
@given(st.text(max_size=200))
def test_random_text(text):
    _load(text)


@SETTINGS
@given(st.binary(max_size=100))
def test_random_bytes(raw):
    _load(raw)


@SETTINGS
@given(documents, annotations, st.sampled_from([None, *HYPERVISOR_NAMES]))
def test_random_structures_and_annotations(document, notes, hypervisor):
    try:
        text = tomli_w.dumps(document)
    except (TypeError, ValueError):  # not representable in TOML (e.g. an array of mixed tables)
        assume(False)
    _load(text, notes, hypervisor)


@SETTINGS
@given(st.lists(st.sampled_from(LINES), max_size=12))
def test_random_line_soups(lines):
    _load("\n".join(lines) + "\n")
