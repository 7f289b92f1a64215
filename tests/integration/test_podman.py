"""podman (4.3, Debian's, rootful, with conmon) driving kabuto as its OCI runtime, each step run
with runc first as the baseline in the same harness.

podman gets a storage root of its own (--root/--runroot/--tmpdir in a temporary directory, the
vfs driver), an image imported from a busybox rootfs tarball built here (no registry), and a
private containers.conf: cgroupfs (the host runs no systemd), a file events log, and no default
ulimits (podman's nofile/nproc 1048576 fail even under runc here: no CAP_SYS_RESOURCE).
``--runtime`` is the kabuto executable of this venv. podman calls the runtime without its own
environment and passes ``--runtime-flag``s to some calls only (not to the cleanup process
conmon starts), so kabuto keeps its state in its default root, /run/kabuto, as a podman user's
would; after each step nothing of the step's containers is left there, nor a process, nor a
mount.

Five VM boots: `run -i --rm` (stdin, stdout, stderr, exit code), `run -d` + `exec` + `logs` +
`stop` + `rm`, `run -t` and `run --uidmap --gidmap` (a user namespace), all with `--network
none`; and `run --rm` on podman's default network (CNI's bridge plugin, containernetworking-
plugins): the container has its address on podman's bridge and reaches a listener in the host's
netns through the bridge's gateway and one in another container's netns (a runc container on the
same bridge); no netns left.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from test_runtime_helpers import KABUTO, busybox_rootfs, require_guest_image

from kabuto.runtime.state import DEFAULT_STATE_ROOT

pytestmark = pytest.mark.vm

IMAGE = "localhost/kabuto-busybox:latest"
STEP_TIMEOUT = 300.0
# podman waits this long for conmon to finish after the container exited
CONMON_EXIT_TIMEOUT = 20.0
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@dataclass
class Podman:
    base: Path

    def __call__(self, runtime: str, *args: str, input: bytes | None = None,
                 timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        command = ["podman", "--root", str(self.base / "store"), "--runroot", str(self.base / "run"),
                   "--tmpdir", str(self.base / "tmp"), "--storage-driver", "vfs",
                   "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", runtime, *args]
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "CONTAINERS_CONF": str(self.base / "containers.conf"), "HOME": str(self.base)}
        return subprocess.run(command, input=input, capture_output=True, timeout=timeout, env=env,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ok(self, runtime: str, *args: str, input: bytes | None = None) -> bytes:
        result = self(runtime, *args, input=input)
        assert result.returncode == 0, f"podman {' '.join(args)} under {runtime}: {result.stderr.decode()}"
        return result.stdout


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    if shutil.which("podman") is None or shutil.which("conmon") is None:
        pytest.fail("podman and conmon are not installed: `make test` installs them (APT_PACKAGES)")
    require_guest_image()
    base = Path(tempfile.mkdtemp(prefix="kbp-", dir="/tmp"))
    try:
        (base / "containers.conf").write_text(CONTAINERS_CONF)
        rootfs = busybox_rootfs(base / "rootfs")
        with tarfile.open(base / "busybox.tar", "w") as tar:
            tar.add(rootfs, arcname=".")
        shutil.rmtree(rootfs)
        tool = Podman(base)
        tool.ok("runc", "import", str(base / "busybox.tar"), IMAGE)
        yield tool
        tool.ok("runc", "rmi", "--all", "--force")
        assert not _mounts_below(base), _mounts_below(base)
    finally:
        subprocess.run(["umount", "-R", "--lazy", str(base / "store")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(path))]


def _container_ids(podman: Podman) -> list[str]:
    out = podman.ok("runc", "ps", "--all", "--no-trunc", "--quiet")
    return out.decode().split()


def _leftovers(podman: Podman, ids: list[str]) -> list[str]:
    left: list[str] = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info.get("cmdline") or [])
            if any(i in cmdline for i in ids) and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"process {process.info['pid']}: {cmdline[:160]}")
        except psutil.Error:
            continue
    for directory in (DEFAULT_STATE_ROOT, DEFAULT_STATE_ROOT / ".vm"):
        left += [f"path {directory / i}" for i in ids if (directory / i).exists()]
    left += [f"mount {m}" for m in _mounts_below(podman.base / "store") if any(i in m for i in ids)]
    return left


def assert_step_left_nothing(podman: Podman, ids: list[str], keep: tuple[str, ...] = ()) -> None:
    """No container in podman's list (but those in ``keep``, still running); of the step's other
    containers no kabuto state, VMM, monitor, conmon or mount. conmon may still be finishing its
    exit command when podman returns: it gets the time podman itself waits for it."""
    assert _container_ids(podman) == list(keep)
    ids = [i for i in ids if i not in keep]
    deadline = time.monotonic() + CONMON_EXIT_TIMEOUT
    while (left := _leftovers(podman, ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "left behind:\n  " + "\n  ".join(left)


def _cidfile(podman: Podman) -> Path:
    """Where `podman run --cidfile` writes the id of a container that --rm removes."""
    return Path(tempfile.mktemp(prefix="cid-", dir=podman.base))


def _cid(path: Path) -> list[str]:
    return [path.read_text().strip()] if path.exists() else []


def _inspect(podman: Podman, name: str, field: str) -> str:
    return podman.ok("runc", "inspect", "--format", "{{" + field + "}}", name).decode().strip()


RUNTIMES = ("runc", str(KABUTO))


def test_run_rm_with_stdin_output_and_exit_code(podman: Podman) -> None:
    seen = {}
    for runtime in RUNTIMES:
        cidfile = _cidfile(podman)
        result = podman(runtime, "run", "-i", "--rm", "--network", "none", "--cidfile", str(cidfile), IMAGE,
                        "sh", "-c", "read line; echo got $line; echo to-stderr >&2; exit 3", input=b"hello\n")
        seen[runtime] = (result.returncode, result.stdout, b"to-stderr" in result.stderr)
        assert_step_left_nothing(podman, _cid(cidfile))
    assert seen["runc"] == (3, b"got hello\n", True), seen["runc"]
    assert seen[str(KABUTO)] == seen["runc"]


def test_detached_exec_logs_stop_rm(podman: Podman) -> None:
    script = "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 1; done"
    seen = {}
    for runtime in RUNTIMES:
        name = "kbp-detached"
        container_id = podman.ok(runtime, "run", "-d", "--network", "none", "--name", name, IMAGE,
                                 "sh", "-c", script).decode().strip()
        try:
            assert _inspect(podman, name, ".State.Status") == "running"
            exec_result = podman(runtime, "exec", name, "sh", "-c", "echo in-exec; echo exec-err >&2; exit 4")
            stopped = podman(runtime, "stop", "--time", "30", name)
            logs = podman.ok(runtime, "logs", name)
            seen[runtime] = (exec_result.returncode, exec_result.stdout, b"exec-err" in exec_result.stderr,
                             stopped.returncode, _inspect(podman, name, ".State.Status"),
                             _inspect(podman, name, ".State.ExitCode"), logs)
        finally:
            podman(runtime, "rm", "--force", name)
        assert_step_left_nothing(podman, [container_id])
    assert seen["runc"] == (4, b"in-exec\n", True, 0, "exited", "0", b"started\nbye\n"), seen["runc"]
    assert seen[str(KABUTO)] == seen["runc"]


def test_run_with_a_terminal(podman: Podman) -> None:
    seen = {}
    for runtime in RUNTIMES:
        cidfile = _cidfile(podman)
        result = podman(runtime, "run", "-t", "--rm", "--network", "none", "--cidfile", str(cidfile), IMAGE,
                        "sh", "-c", "tty; exit 2")
        seen[runtime] = (result.returncode, result.stdout)
        assert_step_left_nothing(podman, _cid(cidfile))
    assert seen["runc"] == (2, b"/dev/pts/0\r\n"), seen["runc"]
    assert seen[str(KABUTO)] == seen["runc"]


def test_run_with_a_user_namespace(podman: Podman) -> None:
    """`--uidmap`/`--gidmap`: podman hands the runtime a user namespace and its mappings (and
    chowns its copy of the image); the container's root is 100000 outside it."""
    seen = {}
    for runtime in RUNTIMES:
        cidfile = _cidfile(podman)
        result = podman(runtime, "run", "--rm", "--network", "none", "--uidmap", "0:100000:65536",
                        "--gidmap", "0:200000:65536", "--cidfile", str(cidfile), IMAGE,
                        "sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u; ls -ln /bin/busybox")
        lines = [line.split() for line in result.stdout.decode().splitlines()]
        seen[runtime] = (result.returncode, lines[:3], lines[3:4] and lines[3][2:4], result.stderr[-300:])
        assert_step_left_nothing(podman, _cid(cidfile))
    assert seen["runc"][:3] == (0, [["0", "100000", "65536"], ["0", "200000", "65536"], ["0"]],
                                ["0", "0"]), seen["runc"]
    assert seen[str(KABUTO)][:3] == seen["runc"][:3], seen


def _serve(listener: socket.socket, reply: bytes) -> None:
    """Answer each connection with ``reply`` until the listener closes."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.sendall(reply)


def _until_listening(address: str, port: int, timeout: float = 30.0) -> None:
    """The peer container's listener answers (from the host, through the bridge)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=2) as connection:
                if connection.recv(64):
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _netns() -> set[str]:
    """The netns podman's CNI made (named cni-<uuid>)."""
    return {p.name for p in Path("/run/netns").glob("cni-*")}


def test_default_network_reaches_the_host_bridge_and_another_netns(podman: Podman) -> None:
    """podman's default network (CNI: bridge cni-podman0, 10.88.0.0/16, gateway 10.88.0.1): the
    VMM runs in the netns podman made, the guest takes eth0's address and routes, and TCP goes
    out through the bridge to the host's netns and to a runc container's netns."""
    netns_before = _netns()
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    threading.Thread(target=_serve, args=(listener, b"from-host\n"), daemon=True).start()
    peer = podman.ok("runc", "run", "-d", "--name", "kbp-peer", IMAGE, "sh", "-c",
                     "while :; do echo from-peer | nc -l -p 7777; done").decode().strip()
    seen = {}
    try:
        peer_ip = _inspect(podman, "kbp-peer", ".NetworkSettings.IPAddress")
        gateway = _inspect(podman, "kbp-peer", ".NetworkSettings.Gateway")
        assert gateway == "10.88.0.1", gateway
        _until_listening(peer_ip, 7777)
        script = (f"ip -4 -o addr show eth0 | grep -o 'inet 10[.]88[.]'; "
                  f"ip route | grep ^default | cut -d' ' -f1-3; "
                  f"nc -w 10 {gateway} {port}; nc -w 10 {peer_ip} 7777; exit 7")
        for runtime in RUNTIMES:
            cidfile = _cidfile(podman)
            result = podman(runtime, "run", "--rm", "--cidfile", str(cidfile), IMAGE, "sh", "-c", script)
            seen[runtime] = (result.returncode, result.stdout)
            assert_step_left_nothing(podman, [*_cid(cidfile), peer], keep=(peer,))
    finally:
        podman("runc", "rm", "--force", "--time", "0", "kbp-peer")
        listener.close()
    assert seen["runc"] == (7, b"inet 10.88.\ndefault via 10.88.0.1\nfrom-host\nfrom-peer\n"), seen["runc"]
    assert seen[str(KABUTO)] == seen["runc"]
    assert_step_left_nothing(podman, [peer])
    assert _netns() == netns_before
