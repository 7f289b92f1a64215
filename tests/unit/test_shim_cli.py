"""containerd-shim-kabuto-v2's command line: containerd's flags, the shim's address, `start`
spawning (or joining) the pod's shim, and `delete` after a shim died."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import test_runtime_fake_vmm as fake_vm
from google.protobuf.empty_pb2 import Empty

from kabuto.protos import containerd_shim_pb2 as pb
from kabuto.runtime.bundle import SANDBOX_ID_ANNOTATION, load_bundle
from kabuto.runtime.sandbox import VirtSandbox
from kabuto.runtime.state import DEFAULT_STATE_ROOT, STATE_ROOT_ENV, SandboxRecord, StateStore
from kabuto.shim import cli
from kabuto.shim.service import TASK_SERVICE
from kabuto.ttrpc import Client

# the fake VMM and guest (autouse); `store` fails a test that leaves anything behind
fakes = fake_vm.fakes
store = fake_vm.store

BOUND = 10.0
CONTAINERD = "/run/containerd/containerd.sock"


def containerd_argv(*tail: str, namespace: str = "default") -> list[str]:
    # what containerd v1.6 runs (runtime/v2/shim/util.go Command, runtime/v2/binary.go)
    return ["-namespace", namespace, "-address", CONTAINERD, "-publish-binary", "/usr/bin/containerd", *tail]


def parse(argv: list[str]) -> argparse.Namespace:
    return cli._parser().parse_args(argv)


@pytest.fixture
def state_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kbs-", dir="/tmp"))
    monkeypatch.setenv(STATE_ROOT_ENV, str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def write_spec(bundle: Path, spec: object) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


# -- flags ----------------------------------------------------------------------------------
def test_containerds_start_command_line() -> None:
    args = parse(containerd_argv("-id", "c1", "-debug", "start", namespace="k8s.io"))
    assert (args.namespace, args.address, args.publish_binary, args.id, args.debug, args.action) == (
        "k8s.io", CONTAINERD, "/usr/bin/containerd", "c1", True, "start")


def test_containerds_delete_command_line() -> None:
    bundle = "/run/containerd/io.containerd.runtime.v2.task/default/c1"
    args = parse(containerd_argv("-id", "c1", "-bundle", bundle, "delete"))
    assert (args.id, args.bundle, args.action, args.debug) == ("c1", bundle, "delete", False)


@pytest.mark.parametrize("form", [["--id=c1"], ["-id=c1"], ["--id", "c1"], ["-id", "c1"]])
def test_go_style_flag_forms(form: list[str]) -> None:
    # Go's flag package takes one or two dashes, with "=" or a separate value
    args = parse(["--namespace=ns", "--address", "a", *form, "start"])
    assert (args.namespace, args.address, args.id, args.action) == ("ns", "a", "c1", "start")


def test_no_action_is_the_daemon() -> None:
    assert parse(containerd_argv("-id", "c1")).action is None


@pytest.mark.parametrize(("argv", "missing"), [
    (["-address", CONTAINERD, "-id", "c1", "start"], "namespace"),
    (["-namespace", "default", "-address", CONTAINERD, "start"], "id"),
    (["-id", "c1", "-bundle", "/b", "delete"], "namespace"),
])
def test_missing_namespace_or_id_exits_1_saying_so(argv: list[str], missing: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert f"-{missing}" in captured.err and "empty" in captured.err
    assert captured.out == ""


def test_daemon_without_its_socket_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(containerd_argv("-id", "c1")) == 1
    assert "start" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-v"]) == 0
    assert cli.RUNTIME_NAME in capsys.readouterr().out


# -- the shim's socket ----------------------------------------------------------------------
def test_socket_path_is_stable_short_and_distinct() -> None:
    default = StateStore(DEFAULT_STATE_ROOT)
    path = cli.socket_path(default, CONTAINERD, "k8s.io", "pod-1")
    assert path == cli.socket_path(StateStore(DEFAULT_STATE_ROOT), CONTAINERD, "k8s.io", "pod-1")
    assert path.parent == DEFAULT_STATE_ROOT / cli.SOCKET_DIR
    assert len(os.fsencode(path)) < 108  # sun_path, with its NUL
    others = {cli.socket_path(default, "/other/containerd.sock", "k8s.io", "pod-1"),
              cli.socket_path(default, CONTAINERD, "default", "pod-1"),
              cli.socket_path(default, CONTAINERD, "k8s.io", "pod-2"),
              # the separator keeps ("a", "b\0c") apart from ("a\0b", "c")
              cli.socket_path(default, CONTAINERD, "k8s.io-pod", "1")}
    assert path not in others and len(others) == 4


def test_grouping_by_cri_sandbox_id(tmp_path: Path) -> None:
    annotations = {SANDBOX_ID_ANNOTATION: "pod-1", "io.kubernetes.cri.container-type": "container"}
    pod_member = write_spec(tmp_path / "app", {"annotations": annotations})
    assert cli._grouping(pod_member, "app") == "pod-1"
    lone = write_spec(tmp_path / "lone", {"annotations": {"other": "x"}})
    assert cli._grouping(lone, "lone") == "lone"
    for odd in ({"annotations": None}, {"annotations": ["x"]}, {"annotations": {SANDBOX_ID_ANNOTATION: 7}},
                {"annotations": {SANDBOX_ID_ANNOTATION: ""}}, {}):
        assert cli._grouping(write_spec(tmp_path / "odd", odd), "t") == "t", odd


@pytest.mark.parametrize("content", ['["not", "an", "object"]', "{broken", '"string"', "null"])
def test_grouping_refuses_a_spec_that_is_not_a_json_object(tmp_path: Path, content: str) -> None:
    tmp_path.joinpath("config.json").write_text(content)
    with pytest.raises(cli.ShimError, match=r"config\.json"):
        cli._grouping(tmp_path, "t")


def test_grouping_without_config_json_names_it(tmp_path: Path) -> None:
    with pytest.raises(cli.ShimError, match=str(tmp_path / "config.json")):
        cli._grouping(tmp_path, "t")


# -- start ----------------------------------------------------------------------------------
def test_start_joins_the_pods_running_shim(state_root: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = write_spec(tmp_path / "app", {"annotations": {SANDBOX_ID_ANNOTATION: "pod-1"}})
    monkeypatch.chdir(bundle)
    path = cli.socket_path(StateStore(state_root), CONTAINERD, "k8s.io", "pod-1")
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as pod_shim:
        pod_shim.bind(str(path))
        pod_shim.listen(1)
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        address = cli.start(parse(containerd_argv("-id", "app", "start", namespace="k8s.io")))
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before  # nothing spawned
    assert address == f"unix://{path}"
    assert (bundle / "address").read_text() == address  # where a restarted containerd looks


def test_start_spawns_a_shim_that_serves_and_goes_when_idle(state_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle = write_spec(tmp_path / "c1", {"annotations": {}})
    monkeypatch.chdir(bundle)
    monkeypatch.delenv(cli.TTRPC_ADDRESS_ENV, raising=False)
    before = set(psutil.Process().children())
    assert cli.main(containerd_argv("-id", "c1", "start")) == 0
    spawned = set(psutil.Process().children()) - before
    try:
        address = capsys.readouterr().out
        path = cli.socket_path(StateStore(state_root), CONTAINERD, "default", "c1")
        assert address == f"unix://{path}"
        connected = asyncio.run(asyncio.wait_for(connect_then_shutdown(path), BOUND))
        assert {shim.pid for shim in spawned} == {connected.shim_pid}
        assert psutil.Process(connected.shim_pid).wait(BOUND) == 0
    finally:
        for shim in spawned:
            if shim.is_running():
                shim.kill()
    assert not path.exists() and not path.parent.exists()


async def connect_then_shutdown(path: Path) -> pb.ConnectResponse:
    client = Client(*await asyncio.open_unix_connection(str(path)), name="shim")
    try:
        connected = await client.call(TASK_SERVICE, "Connect", pb.ConnectRequest(id="c1"), pb.ConnectResponse,
                                      timeout=BOUND)
        await client.call(TASK_SERVICE, "Shutdown", pb.ShutdownRequest(id="c1"), Empty, timeout=BOUND)
    finally:
        await client.close()
    return connected


# -- delete after a shim died ---------------------------------------------------------------
def delete_args(task_id: str, bundle: Path) -> argparse.Namespace:
    return parse(containerd_argv("-id", task_id, "-bundle", str(bundle), "delete"))


def test_delete_of_an_unknown_task_answers_killed_and_leaves_nothing(
        state_root: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    bundle = write_spec(tmp_path / "ghost", {"annotations": {}})
    assert cli.main(containerd_argv("-id", "ghost", "-bundle", str(bundle), "delete")) == 0
    response = pb.DeleteResponse()
    response.ParseFromString(capsysbinary.readouterr().out)
    assert response.exit_status == 128 + 9 and response.exited_at.seconds > 0
    assert sorted(p.name for p in state_root.rglob("*") if p.name != ".lock") == []
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json"]


def test_delete_removes_a_stale_shim_socket(state_root: Path, tmp_path: Path) -> None:
    bundle = write_spec(tmp_path / "c1", {"annotations": {}})
    path = cli.socket_path(StateStore(state_root), CONTAINERD, "default", "c1")
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead_shim:
        dead_shim.bind(str(path))
    asyncio.run(cli.cleanup(delete_args("c1", bundle)))
    assert not path.exists() and not path.parent.exists()


def test_delete_while_the_tasks_shim_still_runs_makes_it_exit(state_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """containerd restarted while the task was being created and lost it: its `delete` finds the
    shim still serving and the shim, left with no task, exits (it stayed for ever before)."""
    bundle = write_spec(tmp_path / "c1", {"annotations": {}})
    monkeypatch.chdir(bundle)
    monkeypatch.delenv(cli.TTRPC_ADDRESS_ENV, raising=False)
    before = set(psutil.Process().children())
    assert cli.main(containerd_argv("-id", "c1", "start")) == 0
    spawned = set(psutil.Process().children()) - before
    capsys.readouterr()
    try:
        (shim,) = spawned
        asyncio.run(asyncio.wait_for(cli.cleanup(delete_args("c1", bundle)), BOUND))
        assert shim.wait(BOUND) == 0
    finally:
        for process in spawned:
            if process.is_running():
                process.kill()
    path = cli.socket_path(StateStore(state_root), CONTAINERD, "default", "c1")
    assert not path.exists() and not path.parent.exists()


async def test_delete_after_the_shim_died_removes_its_vm(store: StateStore, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_ROOT_ENV, str(store.root))
    bundle = fake_vm.make_bundle(tmp_path / "c1", ["sleep"])
    store.reserve(SandboxRecord(id="c1", hypervisor_name="", config_path=None), ["c1"])
    sandbox = await VirtSandbox.create("c1", store, hypervisor_name="fakevmm")
    await sandbox.create_container("c1", load_bundle(bundle))
    await sandbox.disconnect()  # the shim is gone; its VM is not
    response = await asyncio.wait_for(cli.cleanup(delete_args("c1", bundle)), BOUND)
    assert response.exit_status == 137
    # `store` checks that neither the VMM nor any mount or path under the state root is left


async def test_delete_after_the_shim_died_while_booting_removes_its_vm(
        store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Booting is the longest step of Create, so the likeliest moment for containerd to give up."""
    monkeypatch.setenv(STATE_ROOT_ENV, str(store.root))
    bundle = fake_vm.make_bundle(tmp_path / "c1", ["sleep"])
    store.reserve(SandboxRecord(id="c1", hypervisor_name="", config_path=None), ["c1"])
    sandbox = await VirtSandbox.create("c1", store, hypervisor_name="fakevmm")
    await sandbox.disconnect()  # the VM runs, the container was not created yet
    await asyncio.wait_for(cli.cleanup(delete_args("c1", bundle)), BOUND)
    assert store.sandbox_ids() == []


async def test_delete_after_the_shim_died_mid_boot_kills_what_it_spawned(
        store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shim died after spawning the VMM (and virtiofsd) but before recording them: the
    processes are found by the VM directory their command lines name."""
    monkeypatch.setenv(STATE_ROOT_ENV, str(store.root))
    bundle = fake_vm.make_bundle(tmp_path / "c1", ["sleep"])
    store.reserve(SandboxRecord(id="c1", hypervisor_name="", config_path=None), ["c1"])
    vm_dir = store.jailer_root / "c1"
    vm_dir.mkdir(parents=True)
    # sleeps far longer than the test: gone after the cleanup means killed by it
    spawned = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(600)",
                                                   f"{vm_dir}/qmp.sock", start_new_session=True)
    try:
        await asyncio.wait_for(cli.cleanup(delete_args("c1", bundle)), BOUND)
        assert not psutil.pid_exists(spawned.pid) or \
            psutil.Process(spawned.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):
            spawned.kill()
        await spawned.wait()
    assert store.sandbox_ids() == [] and not vm_dir.exists()


async def test_delete_after_the_shim_died_before_booting_removes_its_record(
        store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_ROOT_ENV, str(store.root))
    bundle = fake_vm.make_bundle(tmp_path / "c1", ["sleep"])
    store.reserve(SandboxRecord(id="c1", hypervisor_name="", config_path=None), ["c1"])
    await asyncio.wait_for(cli.cleanup(delete_args("c1", bundle)), BOUND)
    assert store.sandbox_ids() == []


def test_start_under_a_state_root_too_deep_for_a_socket_says_why_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    deep_root = Path(tempfile.mkdtemp(prefix="kbs-", dir="/tmp")) / ("state-" + "r" * 80)
    monkeypatch.setenv(STATE_ROOT_ENV, str(deep_root))
    monkeypatch.chdir(write_spec(tmp_path / "c1", {"annotations": {}}))
    before = set(psutil.Process().children())
    try:
        assert cli.main(containerd_argv("-id", "c1", "start")) == 1
        error = capsys.readouterr().err
        assert "too long" in error and "None" not in error
        assert not (deep_root / cli.SOCKET_DIR).exists()
    finally:
        for shim in set(psutil.Process().children()) - before:
            shim.kill()
        shutil.rmtree(deep_root.parent, ignore_errors=True)
