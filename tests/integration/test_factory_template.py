"""Template mode against real QEMU and the shipped image: `kabuto factory init` saves a template;
sandboxes started through the CLI, the Python API and containerd's shim are clones of it (their
QEMU maps the template's RAM file), each with its own entropy, boot id and the host's clock, its
rootfs and bind mounts on a hot-plugged 9p share and its NIC hot-plugged. Bad input falls back to a
cold boot with a message naming what is wrong, or is refused, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cni_helpers import CniPod, bridge_config, host_netns_fixture, ingress_leftovers, links
from containerd_helpers import CONTAINERD, CTR, Containerd, remove_tree, short_temp_dir
from test_runtime_helpers import (
    assert_nothing_left,
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
)

import kabuto as api
from kabuto.config.loader import builtin_default_text
from kabuto.hypervisor import resolve_config
from kabuto.runtime.factory import WarmRequest
from kabuto.runtime.factory.template import TemplateSource, clones_of, list_templates

pytestmark = pytest.mark.vm

# the guest's wall clock, to the microsecond, its own boot id, and 16 fresh random bytes
PROBE = ("adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} END {printf \"%d.%06d\\n\", s, u}'; "
         "cat /proc/sys/kernel/random/boot_id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")
TIMEOUT = 300.0


def write_config(directory: Path, template_path: Path, extra: str = "") -> Path:
    """The built-in configuration with template mode on (9p: clones map their memory private)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "configuration.toml"
    config.write_text(builtin_default_text())
    (directory / "config.d").mkdir(exist_ok=True)
    (directory / "config.d" / "50-template.toml").write_text(
        '[hypervisor.qemu]\nshared_fs = "virtio-9p"\n' + extra +
        f'[hypervisor.qemu.factory]\nenable_template = true\ntemplate_path = "{template_path}"\n')
    return config


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("templates")
    yield directory
    remove_tree(directory)


@pytest.fixture(scope="module")
def config(state_root: Path, templates: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template made by `kabuto factory init`, as an operator would."""
    require_guest_image()
    path = write_config(tmp_path_factory.mktemp("config"), templates)
    made = kabuto(state_root, "--config", str(path), "factory", "init", "--jailer-root",
                  str(state_root / ".vm"))
    assert made.returncode == 0, made.stderr.decode(errors="replace")
    status = json.loads(kabuto(state_root, "--config", str(path), "factory", "status", "--format", "json",
                               check=True).stdout)
    assert status["current"] and [t["current"] for t in status["templates"]] == [True], status
    return path


def probe(output: bytes) -> tuple[float, str, str]:
    clock, boot_id, random = output.decode().split()
    return float(clock), boot_id, random


def the_template(templates: Path):  # type: ignore[no-untyped-def]
    (template,) = list_templates(templates)
    return template


async def test_two_clones_differ_and_keep_the_hosts_clock(config: Path, state_root: Path, templates: Path,
                                                          tmp_path: Path) -> None:
    """Two clones at once (the API): different random bytes and boot ids, a clock within 1 s of the
    host's, a bind mount and the rootfs on the hot-plugged 9p share."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("hello\n")
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "marker").write_text("rootfs-ok\n")
    template = the_template(templates)
    async with api.AsyncSandbox(config=str(config), state_root=state_root, rootfs=rootfs,
                                binds={"/shared": shared}) as first, \
            api.AsyncSandbox(config=str(config), state_root=state_root, rootfs=rootfs) as second:
        assert first.sandbox.record.warm_start == second.sandbox.record.warm_start == "template"
        vmms = {(await sb.sandbox.hypervisor.get_pids())[0] for sb in (first, second)}
        assert vmms <= set(clones_of(template)), "the clones' QEMU maps the template's RAM"
        readings = []
        for sb in (first, second):
            before = time.time()
            result = await sb.run(["sh", "-c", PROBE])
            after = time.time()
            assert result.exit_code == 0, result.stderr
            clock, boot_id, random = probe(result.stdout)
            assert before - 1 <= clock <= after + 1, (before, clock, after)
            readings.append((boot_id, random))
        (id1, random1), (id2, random2) = readings
        assert id1 != id2 and random1 != random2
        # the template was saved well before: a clock not set would lag by that much
        assert time.time() - template.record["created"] > 2
        result = await first.run(["sh", "-c", "cat /shared/from-host; echo back > /shared/to-host; "
                                              "cat /marker"])
        assert result.stdout == b"hello\nrootfs-ok\n", result.stderr
        assert (shared / "to-host").read_text() == "back\n"


def test_the_cli_runs_a_container_in_a_clone(config: Path, state_root: Path) -> None:
    result = kabuto(state_root, "--debug", "--config", str(config), "run", "--busybox", "--", "sh", "-c",
                    "echo in-a-clone", timeout=TIMEOUT)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert result.stdout == b"in-a-clone\n"
    assert "started from template" in stderr and "booting cold" not in stderr


@pytest.fixture
def host_netns() -> Iterator[str]:
    yield from host_netns_fixture()


def test_a_clone_gets_its_nic_by_hot_plug(config: Path, state_root: Path, host_netns: str,
                                          tmp_path: Path) -> None:
    pod = CniPod(host_netns, bridge_config("198.18.9.0/24", tmp_path / "ipam"))
    try:
        address = pod.result["ips"][0]["address"]
        result = kabuto(state_root, "--debug", "--config", str(config), "run", "--busybox", "--net", pod.path,
                        "--", "sh", "-c", "ip -o -4 addr show eth0 | awk '{print $4}'; "
                                          # the gateway answers ARP (and the TCP SYN with a reset)
                                          "nc -w 5 198.18.9.1 9 </dev/null; "
                                          "ip neigh show 198.18.9.1 | grep -q lladdr && echo gateway-reached",
                        timeout=TIMEOUT)
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 0 and "started from template" in stderr, stderr[-3000:]
        assert result.stdout.decode().split() == [address, "gateway-reached"]
        assert links(pod.name) == ["eth0", "lo"] and ingress_leftovers(pod.name) == []
    finally:
        pod.close()


@pytest.mark.skipif(not (CONTAINERD.is_file() and CTR.is_file()),
                    reason="containerd is not installed (apt-get install containerd)")
def test_containerd_starts_its_task_in_a_clone(config: Path, templates: Path, tmp_path: Path) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    daemon = Containerd(short_temp_dir("kbc-"), short_temp_dir("kbt-"),
                        extra_env={"KABUTO_CONFIG": str(config)})
    try:
        daemon.start()
        daemon.check("run", "-d", "--runtime", "io.containerd.kabuto.v2", "--fifo-dir", str(daemon.fifo_dir),
                     "--rootfs", str(rootfs), "warm", "/bin/sh", "-c",
                     "trap 'exit 0' TERM; while :; do sleep 1; done")
        assert daemon.wait_for_status("warm", "RUNNING") == "RUNNING", daemon.log_tail()
        vmms = [p.pid for p in daemon.vmms()]
        assert vmms and set(vmms) <= set(clones_of(the_template(templates))), daemon.log_tail()
        result = daemon.ctr("task", "exec", "--exec-id", "e1", "warm", "/bin/cat",
                            "/proc/sys/kernel/random/boot_id")
        assert result.returncode == 0 and len(result.stdout.split()[0]) == 36, daemon.explain(result)
        daemon.check("task", "kill", "warm")
        assert daemon.wait_for_status("warm", "STOPPED") == "STOPPED"
        daemon.check("task", "delete", "warm")
        daemon.check("container", "delete", "warm")
        assert not daemon.wait_until_clean()
    finally:
        daemon.stop()
        daemon.force_clean()
        remove_tree(daemon.directory)
        remove_tree(daemon.state_root)


def test_a_template_from_other_inputs_is_never_used(templates: Path, state_root: Path, tmp_path: Path,
                                                    config: Path) -> None:
    other = write_config(tmp_path / "other", templates, extra="default_memory = 384\n")
    result = kabuto(state_root, "--config", str(other), "run", "--busybox", "--", "echo", "cold",
                    timeout=TIMEOUT)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and result.stdout == b"cold\n", stderr
    assert "booting cold" in stderr and "differing: default_memory" in stderr, stderr


async def test_a_template_cut_short_is_refused(config: Path, templates: Path, state_root: Path,
                                              tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A template file cut short (root may truncate it; Kabuto never does) is refused before any
    clone maps it: a cold boot follows (as for other inputs, above), and nothing is made."""
    template = the_template(templates)
    copy = tmp_path / "copy"
    (copy / template.key).mkdir(parents=True)
    for name in ("template.json", "state"):
        shutil.copyfile(template.directory / name, copy / template.key / name)
    shutil.copyfile(template.memory, copy / template.key / "memory")
    os.truncate(copy / template.key / "memory", 4096)  # as `truncate -s 4k` would
    resolved = resolve_config(str(write_config(tmp_path / "cut", copy)))
    request = WarmRequest("cut-short", resolved, state_root / ".vm", None)
    assert await TemplateSource().take(request) is None
    assert "cut short" in caplog.text and "booting cold" in caplog.text
    assert not (state_root / ".vm" / "cut-short").exists()


async def test_destroy_under_a_running_clone(config: Path, state_root: Path, templates: Path) -> None:
    """`factory destroy` unlinks: a running clone keeps its pages and runs on."""
    async with api.AsyncSandbox(config=str(config), state_root=state_root) as sb:
        assert sb.sandbox.record.warm_start == "template"
        gone = kabuto(state_root, "--config", str(config), "factory", "destroy", check=True)
        assert b"1 running clones keep their memory" in gone.stdout, gone.stdout
        assert list_templates(templates) == []
        result = await sb.run(["sh", "-c", "head -c 4000000 /dev/urandom | md5sum >/dev/null && echo alive"])
        assert result.stdout == b"alive\n", result.stderr
    status = kabuto(state_root, "--config", str(config), "factory", "status", check=True)
    assert b"no template under" in status.stdout


def test_a_full_template_path_is_refused_leaving_nothing(state_root: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        config = write_config(tmp_path / "full", small)
        result = kabuto(state_root, "--config", str(config), "factory", "init", "--jailer-root",
                        str(state_root / ".vm"))
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 1 and "MiB free, a template needs" in stderr, stderr
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
    assert_nothing_left(state_root)


