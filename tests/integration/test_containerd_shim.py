"""containerd-shim-kabuto-v2 under a real containerd (Debian's 1.6), driven with ctr.

One containerd serves the module, with its root, state and socket in a temporary directory and
the shim's state root (KABUTO_STATE_ROOT, passed on to shims) in another. Most tests boot a
VM; every test ends with nothing left: no shim, no VMM, no mount, no file under the state root,
no container or task in containerd.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from containerd_helpers import (
    CONTAINERD,
    CTR,
    Containerd,
    describe,
    processes_naming,
    remove_tree,
    run_in_pty,
    short_temp_dir,
    write_oci_archive,
    write_unbootable_config,
)
from test_runtime_helpers import busybox_rootfs, require_guest_image

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

RUNTIME = "io.containerd.kabuto.v2"
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
BOOT_ID = ["/bin/cat", "/proc/sys/kernel/random/boot_id"]

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not (CONTAINERD.is_file() and CTR.is_file()),
                       reason="containerd is not installed (apt-get install containerd)"),
]


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    require_guest_image()
    directory = short_temp_dir("kbc-")
    state_root = short_temp_dir("kbt-")
    daemon = Containerd(directory, state_root)
    try:
        daemon.start()
        yield daemon
        left = daemon.wait_until_clean()
        daemon.stop()
        # without containerd: no process names its directory, and the state root stays empty
        left += [f"process {describe(p)}" for p in processes_naming(str(directory))]
        left += daemon.leftovers()
        assert not left, "left behind:\n  " + "\n  ".join(left)
    finally:
        daemon.stop()
        daemon.force_clean()
        remove_tree(directory)
        remove_tree(state_root)


@pytest.fixture(autouse=True)
def nothing_left(containerd: Containerd) -> Iterator[None]:
    """Each test ends clean; a failed one is cleaned up so that the next starts from nothing."""
    yield
    if containerd.process is None:  # a test stopped containerd and failed before restarting it
        containerd.start()
    left = containerd.wait_until_clean()
    if left:
        containerd.force_clean()
    assert not left, "left behind:\n  " + "\n  ".join(left) + f"\ncontainerd's log:\n{containerd.log_tail()}"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_rootfs(tmp_path_factory.mktemp("containerd") / "rootfs")


def run_args(containerd: Containerd, rootfs: Path, *flags: str) -> list[str]:
    """``ctr run`` with this runtime and rootfs: the container id and command follow."""
    return ["run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), *flags,
            "--rootfs", str(rootfs)]


def stop_and_delete(containerd: Containerd, task_id: str) -> None:
    """SIGTERM (SLEEPER traps it), STOPPED in `ctr task ls`, then delete the task and container."""
    containerd.check("task", "kill", task_id)
    assert containerd.wait_for_status(task_id, "STOPPED") == "STOPPED", containerd.log_tail()
    containerd.check("task", "delete", task_id)
    containerd.check("container", "delete", task_id)


def test_run_prints_output_and_returns_exit_code(containerd: Containerd, rootfs: Path) -> None:
    result = containerd.ctr(*run_args(containerd, rootfs), "hello",
                            "/bin/sh", "-c", "echo hello; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"hello\n", b"err\n"), \
        containerd.explain(result)
    # the shim's debug log (containerd runs at debug level) reaches containerd's own log
    assert b"qemu-system" in containerd.log_path.read_bytes(), containerd.log_tail()
    # without --rm ctr deletes the task but keeps the container
    assert containerd.task_status() == {}
    assert containerd.check("container", "ls", "-q").stdout.split() == [b"hello"]
    containerd.check("container", "delete", "hello")
    left = containerd.wait_until_clean()
    assert not left, left


def test_run_rm_passes_stdin(containerd: Containerd, rootfs: Path) -> None:
    # stdin that ends before the task exists: ctr closes the FIFO but cannot send CloseIO yet
    early = containerd.ctr(*run_args(containerd, rootfs, "--rm"), "early", "/bin/cat", input=b"early\n")
    assert (early.returncode, early.stdout) == (0, b"early\n"), containerd.explain(early)
    # stdin that ends while the task runs: ctr sends CloseIO
    late = containerd.run_feeding_stdin(*run_args(containerd, rootfs, "--rm"), "late", "/bin/cat",
                                        task_id="late", data=b"late\n")
    assert (late.returncode, late.stdout) == (0, b"late\n"), containerd.explain(late)
    assert containerd.check("container", "ls", "-q").stdout == b""


def test_image_rootfs_from_the_snapshotter(containerd: Containerd, tmp_path: Path) -> None:
    # an image imported from a local OCI archive: containerd unpacks it and hands the shim
    # the snapshotter's overlay mount instead of a rootfs directory
    image_rootfs = busybox_rootfs(tmp_path / "rootfs")
    (image_rootfs / "marker").write_text("from the image\n")
    image = "docker.io/library/kbt-busybox:latest"
    containerd.check("image", "import", str(write_oci_archive(image_rootfs, image, tmp_path / "image.tar")))
    try:
        result = containerd.ctr("run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), "--rm",
                                image, "image", "sh", "-c", "cat /marker; echo written > /new; cat /new")
        assert (result.returncode, result.stdout) == (0, b"from the image\nwritten\n"), \
            containerd.explain(result)
    finally:
        containerd.check("image", "remove", image)


def test_host_bind_mount_under_a_seccomp_profile(containerd: Containerd, rootfs: Path,
                                                 tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "f").write_text("from the host\n")
    # --seccomp: ctr adds containerd's default profile, as CRI does for RuntimeDefault pods
    result = containerd.ctr(*run_args(containerd, rootfs, "--rm", "--seccomp", "--mount",
                                      f"type=bind,src={shared},dst=/host,options=rbind:ro"),
                            "binds", "/bin/sh", "-c", "cat /host/f; echo x > /host/g")
    assert result.returncode != 0 and result.stdout == b"from the host\n", containerd.explain(result)
    assert b"Read-only file system" in result.stderr, containerd.explain(result)
    assert sorted(p.name for p in shared.iterdir()) == ["f"]


def test_detached_task_exec_ps_pause_kill(containerd: Containerd, rootfs: Path) -> None:
    containerd.check(*run_args(containerd, rootfs, "--detach"), "detached", *SLEEPER)
    assert containerd.task_status() == {"detached": "RUNNING"}

    result = containerd.ctr("task", "exec", "--fifo-dir", str(containerd.fifo_dir), "--exec-id", "e1",
                            "detached", "/bin/sh", "-c", "echo in-exec; exit 5")
    assert (result.returncode, result.stdout) == (5, b"in-exec\n"), containerd.explain(result)

    # the kabuto CLI shares the state root: it reads the shim's sandbox but leaves changes to the shim
    cli = [str(Path(sys.executable).with_name("kabuto"))]
    env = {**os.environ, "KABUTO_STATE_ROOT": str(containerd.state_root)}
    state = subprocess.run([*cli, "state", "detached"], capture_output=True, env=env, timeout=60)
    assert state.returncode == 0 and json.loads(state.stdout)["status"] == "running", state
    refused = subprocess.run([*cli, "exec", "detached", "/bin/true"], capture_output=True, env=env,
                             timeout=60)
    assert refused.returncode != 0 and b"managed by containerd-shim-kabuto-v2" in refused.stderr, refused

    # an exec that cannot start fails at once and releases ctr's FIFOs (ctr would wait on them)
    missing = containerd.ctr("task", "exec", "--fifo-dir", str(containerd.fifo_dir), "--exec-id", "e0",
                             "detached", "/nonexistent")
    assert missing.returncode != 0 and b"/nonexistent" in missing.stderr, containerd.explain(missing)
    assert containerd.task_status() == {"detached": "RUNNING"}

    # `ctr task ps` prints a header, then one "PID INFO" row per process
    rows = containerd.check("task", "ps", "detached").stdout.decode().splitlines()[1:]
    assert rows and all(row.split()[0].isdigit() for row in rows), rows

    # an exec id the shim does not know: an error containerd can show, the task unharmed
    ghost = containerd.ctr("task", "kill", "--exec-id", "ghost", "detached")
    assert ghost.returncode != 0 and (b"ghost" in ghost.stderr or b"not found" in ghost.stderr), \
        containerd.explain(ghost)

    containerd.check("task", "pause", "detached")
    assert containerd.task_status() == {"detached": "PAUSED"}
    containerd.check("task", "resume", "detached")
    assert containerd.task_status() == {"detached": "RUNNING"}
    after = containerd.ctr("task", "exec", "--fifo-dir", str(containerd.fifo_dir), "--exec-id", "e2",
                           "detached", "/bin/echo", "resumed")
    assert (after.returncode, after.stdout) == (0, b"resumed\n"), containerd.explain(after)

    stop_and_delete(containerd, "detached")


def test_terminal(containerd: Containerd, rootfs: Path) -> None:
    command = containerd.ctr_command(*run_args(containerd, rootfs, "--rm", "--tty"), "terminal",
                                     "/bin/sh", "-c", "tty; read line; echo got:$line; exit 4")
    # typed once the task runs: what ctr reads from its terminal reaches the container's
    code, output = run_in_pty(command, send=b"typed\r",
                              when=lambda: containerd.task_status().get("terminal") == "RUNNING")
    assert code == 4, output
    # the pty is the container's own, as under runc: not /dev/console
    assert re.search(rb"(?m)^/dev/pts/0\r*$", output), output
    assert b"got:typed" in output, output


def test_task_survives_containerd_restart(containerd: Containerd, rootfs: Path) -> None:
    containerd.check(*run_args(containerd, rootfs, "--detach"), "survivor", *SLEEPER)
    shims = {shim.pid for shim in containerd.shims()}
    assert len(shims) == 1, shims

    containerd.restart()
    assert containerd.task_status() == {"survivor": "RUNNING"}
    # containerd reconnected to the same shim; it did not start another
    assert {shim.pid for shim in containerd.shims()} == shims
    result = containerd.ctr("task", "exec", "--fifo-dir", str(containerd.fifo_dir), "--exec-id", "after",
                            "survivor", "/bin/sh", "-c", "echo still here")
    assert (result.returncode, result.stdout) == (0, b"still here\n"), containerd.explain(result)

    stop_and_delete(containerd, "survivor")


def test_bad_input_fails_clearly_and_leaves_nothing(containerd: Containerd, rootfs: Path,
                                                    tmp_path: Path) -> None:
    unknown = containerd.ctr("task", "kill", "nosuch")
    assert unknown.returncode != 0 and b"not found" in unknown.stderr, containerd.explain(unknown)

    # each reaches the shim, which refuses it with a message naming the problem
    config = write_unbootable_config(tmp_path)

    cases = {
        # the rootfs the spec names does not exist
        "norootfs": (["run", "--runtime", RUNTIME, "--fifo-dir", str(containerd.fifo_dir), "--rm",
                      "--rootfs", "/nonexistent/rootfs"], b"/nonexistent/rootfs"),
        # an annotation the configuration does not let pods set
        "refused": (run_args(containerd, rootfs, "--rm", "--annotation",
                             "io.katacontainers.config.hypervisor.machine_type=pc"), b"machine_type"),
        # a VM that cannot boot: the runtime options name a config whose kernel is garbage
        "nokernel": (run_args(containerd, rootfs, "--rm", "--runtime-config-path", str(config)), b"kernel"),
    }
    for container_id, (args, message) in cases.items():
        result = containerd.ctr(*args, container_id, "/bin/true")
        assert result.returncode != 0 and message in result.stderr, containerd.explain(result)
        left = containerd.wait_until_clean()
        assert not left, (container_id, left)


def test_pod_containers_share_one_shim_and_vm(containerd: Containerd, rootfs: Path) -> None:
    def pod_member(kind: str) -> list[str]:
        return run_args(containerd, rootfs, "--detach",
                        "--annotation", f"{CONTAINER_TYPE_ANNOTATION}={kind}",
                        "--annotation", f"{SANDBOX_ID_ANNOTATION}=pod")

    def boot_id(task_id: str) -> bytes:
        result = containerd.ctr("task", "exec", "--fifo-dir", str(containerd.fifo_dir),
                                "--exec-id", "boot-id", task_id, *BOOT_ID)
        assert result.returncode == 0 and result.stdout.strip(), containerd.explain(result)
        return result.stdout

    containerd.check(*pod_member("sandbox"), "pod", *SLEEPER)
    containerd.check(*pod_member("container"), "app", *SLEEPER)
    assert containerd.task_status() == {"pod": "RUNNING", "app": "RUNNING"}
    shims, vmms = containerd.shims(), containerd.vmms()
    assert len(shims) == 1 and len(vmms) == 1, [describe(p) for p in shims + vmms]
    pod_shim, pod_vmm = shims[0], vmms[0]
    # one guest kernel for both
    assert boot_id("pod") == boot_id("app")

    # a container without the annotations gets a shim and VM of its own
    containerd.check(*run_args(containerd, rootfs, "--detach"), "lone", *SLEEPER)
    assert len(containerd.shims()) == 2, [describe(p) for p in containerd.shims()]
    assert len(containerd.vmms()) == 2, [describe(p) for p in containerd.vmms()]
    assert boot_id("lone") != boot_id("pod")
    stop_and_delete(containerd, "lone")

    # the sandbox's shim and VM outlive the app container
    stop_and_delete(containerd, "app")
    assert containerd.task_status() == {"pod": "RUNNING"}
    assert pod_shim.is_running() and pod_vmm.is_running()
    stop_and_delete(containerd, "pod")


def test_kabuto_config_from_containerd_environment(rootfs: Path, tmp_path: Path) -> None:
    """containerd passes its environment to shims: $KABUTO_CONFIG there is the shim's default."""
    daemon = Containerd(short_temp_dir("kbc-"), short_temp_dir("kbt-"),
                        extra_env={"KABUTO_CONFIG": str(write_unbootable_config(tmp_path))})
    try:
        daemon.start()
        result = daemon.ctr(*run_args(daemon, rootfs, "--rm"), "unbootable", "/bin/true")
        assert result.returncode != 0 and b"kernel" in result.stderr, daemon.explain(result)
        left = daemon.wait_until_clean()
        assert not left, left
    finally:
        daemon.stop()
        daemon.force_clean()
        remove_tree(daemon.directory)
        remove_tree(daemon.state_root)
