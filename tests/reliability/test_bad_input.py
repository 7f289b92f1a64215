"""Bad input at scale, property-based (hypothesis): annotations, OCI specs and every answer the host
accepts from the guest. Each example's outcome is exact: accepted with the values an oracle written
here expects, or refused with the project's error naming the annotation or field; never another
exception. (tests/unit/test_config_property.py does configuration files; make soak runs more
examples of each.)"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import scale

import kabuto.image
from kabuto.agent.address import parse_agent_address
from kabuto.agent.client import AgentClient
from kabuto.agent.containers import ContainerClient, Interface, Route
from kabuto.config import loader
from kabuto.errors import ConfigError, KabutoError
from kabuto.hypervisor import resolve_config
from kabuto.protos import ttrpc_pb2
from kabuto.runtime.bundle import Bundle, BundleError, check_spec, default_spec
from kabuto.ttrpc import Client, MessageType, encode_frame, read_frame

SETTINGS = settings(max_examples=scale(200, 5000), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PREFIX = "io.katacontainers.config."
CONFIG = """
[hypervisor.qemu]
enable_annotations = [".*"]
[agent.kata]
[runtime]
"""


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "SYSTEM_PATH", tmp_path / "absent.toml")
    image = SimpleNamespace(kernel=Path("/bin/sh"), initrd=Path("/bin/sh"))
    monkeypatch.setattr(kabuto.image, "installed_image", lambda: image, raising=False)


# -- annotations -------------------------------------------------------------------------------
def boolean(text: str) -> bool | None:
    return {"true": True, "false": False}.get(text.strip())


def unsigned(text: str) -> int | None:
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]{1,20}", text) and int(text) < 2**64 else None


def number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value >= 0 and value not in (float("inf"),) and value == value else None


def mebibytes(text: str) -> int | None:
    units = {"": 1 << 20, "mi": 1 << 20, "gi": 1 << 30, "m": 10**6, "g": 10**9, "ki": 1 << 10, "k": 1000}
    match = re.fullmatch(r"([0-9]{1,15})\s*([A-Za-z]{0,3})", text.strip())
    if not match or match.group(2).lower() not in units:
        return None
    return int(match.group(1)) * units[match.group(2).lower()] // (1 << 20)


# annotation suffix -> (where the value lands, the parse an accepted value must equal; None: refused)
ORACLE: dict[str, tuple[Callable[[Any], Any], Callable[[str], Any]]] = {
    "hypervisor.default_vcpus": (lambda c: c.hypervisor["qemu"].default_vcpus, number),
    "hypervisor.default_memory": (lambda c: c.hypervisor["qemu"].default_memory, mebibytes),
    "hypervisor.memory_slots": (lambda c: c.hypervisor["qemu"].memory_slots, unsigned),
    "hypervisor.enable_iothreads": (lambda c: c.hypervisor["qemu"].enable_iothreads, boolean),
    "hypervisor.disable_vhost_net": (lambda c: c.hypervisor["qemu"].disable_vhost_net, boolean),
    "hypervisor.network_queues": (lambda c: c.hypervisor["qemu"].network_queues, unsigned),
    "agent.container_pipe_size": (lambda c: c.active_agent.container_pipe_size, unsigned),
    "agent.cdh_api_timeout_ms": (lambda c: c.active_agent.cdh_api_timeout_ms, unsigned),
    "runtime.disable_guest_seccomp": (lambda c: c.runtime.disable_guest_seccomp, boolean),
    "runtime.sandbox_cgroup_only": (lambda c: c.runtime.sandbox_cgroup_only, boolean),
    "runtime.create_container_timeout": (lambda c: c.runtime.create_container_timeout,
                                         lambda t: v if (v := unsigned(t)) and 0 < v <= 3600 else None),
}
# as in Kata's files, 0 (or a size under 1 MiB) for these means the configuration's default
ZERO_MEANS_DEFAULT = {"hypervisor.default_vcpus", "hypervisor.default_memory"}
# keys under our prefixes that annotations may never set: always refused
REFUSED = ["hypervisor.valid_hypervisor_paths", "hypervisor.enable_annotations", "hypervisor.no_such_key",
           "agent.no_such_key", "runtime.no_such_key", "runtime.jailer_path"]

values = st.one_of(
    st.sampled_from(["true", "false", " true ", "True", "1", "0", "-1", "2", "16", "4096", "1e3", "nan",
                     "inf", "512Mi", "2Gi", "1G", "3 Mi", "18446744073709551616", "", " ", "\0", "x" * 5000]),
    st.integers(min_value=-10, max_value=2**70).map(str),
    st.floats(allow_nan=True).map(str),
    st.text(max_size=20),
)
annotation_sets = st.dictionaries(
    st.one_of(st.sampled_from([*ORACLE, *REFUSED]).map(lambda s: PREFIX + s),
              st.sampled_from(["org.example.unrelated", "io.kubernetes.cri.sandbox-id"])),
    values, max_size=4)


@SETTINGS
@given(annotation_sets)
def test_annotations_are_applied_exactly_or_refused_by_name(tmp_path: Path, notes: dict[str, str]) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text(CONFIG)
    baseline = resolve_config(path, {}, None).config
    try:
        config = resolve_config(path, notes, None).config
    except ConfigError as exc:
        text = str(exc)
        named = [key for key in notes if key in text]
        assert named, f"refused without naming an annotation: {text}"
        for key in named:  # each one named is one the oracle refuses, or whose value a rule refused
            suffix = key.removeprefix(PREFIX)
            assert suffix in REFUSED or suffix in ORACLE, text
        return
    for key, value in notes.items():
        suffix = key.removeprefix(PREFIX)
        assert suffix not in REFUSED, f"{key} = {value!r} was accepted"
        if suffix in ORACLE:
            where, parse = ORACLE[suffix]
            expected = parse(value) if len(value) <= 4096 and "\0" not in value else None
            assert expected is not None, f"{key} = {value!r} was accepted"
            if expected == 0 and suffix in ZERO_MEANS_DEFAULT:
                expected = where(baseline)
            assert where(config) == expected, (key, value, where(config))


# -- OCI specs ---------------------------------------------------------------------------------
# (path into the spec, whether a list index) for the fields check_spec reads
FIELDS = ["ociVersion", "root", "root.path", "root.readonly", "hostname", "process", "process.args",
          "process.cwd", "process.env", "process.terminal", "process.user", "process.user.uid",
          "process.user.gid", "process.user.umask", "process.user.additionalGids", "process.user.username",
          "process.rlimits", "mounts", "annotations", "linux", "linux.namespaces", "linux.sysctl",
          "linux.seccomp", "hooks", "windows", "solaris"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
mutations = st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just(KeyError), json_values)),
                     min_size=1, max_size=3)


def mutate(spec: dict[str, Any], field: str, value: object) -> None:
    *parents, last = field.split(".")
    node: Any = spec
    for part in parents:
        if not isinstance(node, dict):
            return
        node = node.setdefault(part, {})
    if isinstance(node, dict):
        if value is KeyError:
            node.pop(last, None)
        else:
            node[last] = value


@SETTINGS
@given(mutations)
def test_oci_specs_are_accepted_or_refused_naming_the_field(changes: list[tuple[str, object]]) -> None:
    spec = default_spec(["sh"], "/rootfs")
    for field, value in changes:
        mutate(spec, field, copy.deepcopy(value))
    try:
        check_spec(json.loads(json.dumps(spec)), "config.json")
    except BundleError as exc:
        text = str(exc)
        assert text.startswith("config.json: "), text
        named = text.removeprefix("config.json: ").split(":")[0]
        top = named.split(".")[0].split("[")[0]
        # the field named is one of the mutated ones, a parent or a child of one
        assert any(field.split(".")[0] == top for field, _ in changes), (text, changes)
        return
    # accepted: the guest is given the spec as it was, but for the root's path (the guest's) and
    # what means nothing in a VM (host cgroup placement, seccomp, host namespace paths)
    bundle = Bundle(Path("/bundle"), spec, Path("/rootfs"))
    joined = {kind: "sandbox" for kind in bundle.namespace_paths if kind != "network"}
    guest = bundle.guest_spec("/run/kabuto/c/rootfs", {}, joined)
    assert guest["root"] == {**spec["root"], "path": "/run/kabuto/c/rootfs"}
    for key in ("process", "hostname", "mounts", "annotations", "ociVersion"):
        assert guest.get(key) == spec.get(key), key
    dropped = ("seccomp", "cgroupsPath", "namespaces")
    linux = {k: v for k, v in spec.get("linux", {}).items() if k not in dropped}
    assert {k: v for k, v in guest.get("linux", {}).items() if k != "namespaces"} == linux


# -- every answer the host accepts from the guest ----------------------------------------------
def calls(client: ContainerClient) -> dict[str, Callable[[], Any]]:
    return {
        "CreateContainer": lambda: client.create_container("c", {"ociVersion": "1.0.2"}),
        "StartContainer": lambda: client.start_container("c"),
        "ExecProcess": lambda: client.exec_process("c", "e", {"args": ["true"]}),
        "WaitProcess": lambda: client.wait_process("c", "e", timeout=0.5),
        "ReadStdout": lambda: client.read_stdout("c", "e", max_len=64, timeout=0.5),
        "WriteStdin": lambda: client.write_stdin("c", "e", b"data", timeout=0.5),
        "ListProcesses": lambda: client.list_processes("c"),
        "StatsContainer": lambda: client.stats_container("c"),
        "UpdateInterface": lambda: client.update_interface(Interface("eth0", "02:00:00:00:00:01")),
        "UpdateRoutes": lambda: client.update_routes([Route("default", "10.0.0.1", "eth0")]),
        "CopyFileOut": lambda: client.copy_file_out("/f", max_size=1024),
        "GetGuestDetails": lambda: client.agent.guest_details(),
    }


answers = st.one_of(
    st.binary(max_size=64),
    # well-formed varint/length fields with hostile sizes: counts, lengths, nested messages
    st.lists(st.tuples(st.integers(1, 12), st.sampled_from([0, 2]),
                       st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32))), max_size=6)
    .map(lambda fields: b"".join(_field(*f) for f in fields)),
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, value: int | bytes) -> bytes:
    if wire == 0:
        return _varint(number << 3) + _varint(value if isinstance(value, int) else len(value))
    data = value if isinstance(value, bytes) else _varint(value)
    return _varint(number << 3 | 2) + _varint(len(data)) + data


async def one_answer(method: str, payload: bytes, status_code: int) -> None:
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    guest_reader, guest_writer = await asyncio.open_connection(sock=right)
    agent = AgentClient(parse_agent_address("unix:///hostile"), Client(reader, writer, name="guest"), 0.5)
    client = ContainerClient(agent, poll_interval=0.5)

    async def guest() -> None:
        while (frame := await read_frame(guest_reader)) is not None:
            response = ttrpc_pb2.Response(payload=payload)
            if status_code:
                response.status.code = status_code
            guest_writer.write(encode_frame(frame.stream_id, MessageType.RESPONSE, 0,
                                            response.SerializeToString()))

    serving = asyncio.create_task(guest())
    try:
        await asyncio.wait_for(calls(client)[method](), 5)
    except KabutoError:
        pass  # refused, naming the agent and the method
    finally:
        serving.cancel()
        await agent.close()
        guest_writer.close()


@SETTINGS
@given(st.sampled_from(sorted(calls(None).keys())), answers,  # type: ignore[arg-type]
       st.sampled_from([0, 0, 0, 2, 4, 5]))
def test_every_guest_answer_is_taken_or_refused_as_an_agent_error(method: str, payload: bytes,
                                                                  status_code: int) -> None:
    asyncio.run(one_answer(method, payload, status_code))
