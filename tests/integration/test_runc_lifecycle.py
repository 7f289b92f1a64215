"""runc's detached lifecycle as its callers (conmon, containerd's runc shim, the OCI validation
suite) see it, with runc as the oracle: the same steps under both, observations compared.

The test process is a child subreaper, as conmon is, so the process standing for a container
(runc's init; kabuto's monitor) is reparented to it and reaped here with its exit status.
Covered: --pid-file and state's pid, state's fields through create/start/exit, stdin/stdout/
stderr inherited from create, the exit status, a signal sent to that pid (SIGTERM forwarded,
SIGKILL stopping the container), kill --all, events --stats, ps --format json, a pty
master received over --console-socket (window size, input, output), exec --detach --pid-file,
exec --process --tty --console-socket, and bad input (console socket that is not a socket, a
terminal without one, a process file that is not JSON, exec into a stopped container, a pid
file in a missing directory): exit codes as runc's, the JSON log line, nothing left.
Kabuto's containers join one sandbox VM (CRI pod annotations, which runc ignores): one boot.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_runtime_helpers import (
    KABUTO,
    assert_nothing_left,
    busybox_rootfs,
    new_state_root,
    remove_state_root,
    require_guest_image,
    write_bundle,
)

from kabuto.runtime.bundle import CONTAINER_TYPE_ANNOTATION, SANDBOX_ID_ANNOTATION

pytestmark = pytest.mark.vm

POD = "lifepod"
CLI_TIMEOUT = 300.0
EXIT_TIMEOUT = 120.0
PR_SET_CHILD_SUBREAPER = 36
# a VMM that `delete` stopped ends at once; its virtiofsd follows within a second or two
ADOPTED_EXIT_TIMEOUT = 30.0
SLEEPER = ["sh", "-c", "while :; do sleep 1; done"]
USER_NAMESPACE = {
    "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user")],
    "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 65536}],
}


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """The test process as a child subreaper; on the way out it reaps what it adopted besides the
    containers' processes the test waits for: kabuto's QEMU and virtiofsd (started in their own
    session by a CLI call that has exited) are reparented here too, and were left as zombies
    under pytest for the rest of the suite once `delete` had stopped them."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = {child.pid for child in psutil.Process().children()}
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        adopted = [child for child in psutil.Process().children() if child.pid not in own]
        running = [child for child in adopted if wait_reaped(child.pid, ADOPTED_EXIT_TIMEOUT) is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            wait_reaped(child.pid, ADOPTED_EXIT_TIMEOUT)
        assert not running, f"still running after the test: {[c.pid for c in running]}"


def wait_reaped(pid: int, timeout: float) -> int | None:
    """Reap our child ``pid`` once it exits within ``timeout``: its wait status, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already (a subprocess call of the test's own)
            return 0
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def wait_exit(pid: int, timeout: float = EXIT_TIMEOUT) -> int:
    """The exit code of our (adopted) child ``pid``, as a shell reports it (128+N for signal N)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit within {timeout:g}s")


class Runtime:
    def __init__(self, name: str, binary: str, root: Path, work: Path, annotations: dict[str, str]) -> None:
        self.name, self.binary, self.root, self.work, self.annotations = name, binary, root, work, annotations
        self.log = work / "runtime.log"

    def __call__(self, *args: str, stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None
                 ) -> subprocess.CompletedProcess[bytes]:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            done = subprocess.run([self.binary, "--root", str(self.root), "--log", str(self.log),
                                   "--log-format", "json", *args], stdin=stdin, stdout=stdout or out,
                                  stderr=stderr or err, timeout=CLI_TIMEOUT)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        done = self(*args, **kwargs)
        assert done.returncode == 0, f"{self.name} {' '.join(args)}: {done.stderr.decode(errors='replace')}"
        return done

    def state(self, container_id: str) -> dict[str, Any]:
        return json.loads(self.ok("state", container_id).stdout)

    def bundle(self, name: str, rootfs: Path, args: list[str], terminal: bool = False,
               linux: dict[str, Any] | None = None, mounts: tuple[dict[str, Any], ...] = ()) -> Path:
        def change(spec: dict[str, Any]) -> None:
            spec["process"]["terminal"] = terminal
            spec["linux"].update(linux or {})
            spec["mounts"] += list(mounts)
        return write_bundle(self.work / name, rootfs, args, annotations=self.annotations, change=change)

    def last_log(self) -> dict[str, Any]:
        return json.loads(self.log.read_text().splitlines()[-1])


class ConsoleSocket:
    """What conmon does with --console-socket: listen, receive the master over SCM_RIGHTS."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)

    def receive(self, timeout: float = 30.0) -> tuple[bytes, int]:
        self.server.settimeout(timeout)
        connection, _ = self.server.accept()
        with connection:
            fds = array.array("i")
            name, ancillary, _, _ = connection.recvmsg(256, socket.CMSG_LEN(fds.itemsize))
            for level, kind, data in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(data[:fds.itemsize])
        assert len(fds) == 1, "no fd came over the console socket"
        return name, fds[0]

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)


def read_until(fd: int, marker: bytes, timeout: float = EXIT_TIMEOUT) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 1.0)
        if readable:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            data += chunk
    return data


# linux.resources the host cgroup at cgroupsPath must show (the OCI suite's linux_cgroups_pids,
# linux_cgroups_cpus, their relative forms, delete_resources)
RESOURCES = {"cpu": {"shares": 2048, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"},
             "pids": {"limit": 1000}}
CGROUP_V2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
# controller -> the files it shows RESOURCES in
CGROUP_FILES = (
    {"pids": ["pids.max"], "cpu": ["cpu.weight", "cpu.max"], "cpuset": ["cpuset.cpus"]} if CGROUP_V2
    else {"pids": ["pids.max"], "cpu": ["cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us"],
          "cpuset": ["cpuset.cpus", "cpuset.mems"]})


def thread_group(tid: int) -> int:
    """The process thread ``tid`` belongs to."""
    status = Path(f"/proc/{tid}/status").read_text()
    return int(status.split("\nTgid:", 1)[1].split()[0])


def host_cgroup(pid: int, controller: str) -> Path:
    """The host cgroup directory ``pid`` is in for ``controller`` (v1: its own hierarchy)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (CGROUP_V2 and controllers == "") or controller in controllers.split(","):
            base = Path("/sys/fs/cgroup") if CGROUP_V2 else Path("/sys/fs/cgroup") / controller
            return base / path.lstrip("/")
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def cgroup_step(rt: Runtime, rootfs: Path, name: str, cgroups_path: str, etc: Path) -> dict[str, Any]:
    """A container with cgroupsPath and CPU/pids limits, and a host bind named after its source
    with a propagation option (the suite's `mounts`): what the host's cgroup files show while it
    exists, the root of the bind in the container's mountinfo, and that delete removes the cgroup."""
    bind = {"destination": "/mnt/etc", "source": str(etc), "options": ["rbind", "rslave"]}
    bundle = rt.bundle(name, rootfs, ["sh", "-c", "grep ' /mnt/etc ' /proc/self/mountinfo | cut -d' ' -f4"],
                       linux={"cgroupsPath": cgroups_path, "resources": RESOURCES}, mounts=(bind,))
    pid_file = rt.work / f"{name}.pid"
    with (rt.work / f"{name}.out").open("wb") as out:
        rt.ok("create", "--bundle", str(bundle), "--pid-file", str(pid_file), name, stdout=out)
    pid = int(pid_file.read_text())
    directories = {controller: host_cgroup(pid, controller) for controller in CGROUP_FILES}
    seen = {
        "at-path": all(str(d).endswith(cgroups_path.lstrip("/")) for d in directories.values()),
        "limits": {f: (d / f).read_text().strip() for c, d in directories.items() for f in CGROUP_FILES[c]},
    }
    rt.ok("start", name)
    seen["exit"] = wait_exit(pid)
    seen["bind-root-name"] = Path((rt.work / f"{name}.out").read_text().strip()).name
    rt.ok("delete", name)
    seen["removed"] = [d.exists() for d in directories.values()]
    return seen


def oom_step(rt: Runtime, rootfs: Path) -> list[dict[str, Any]]:
    """A container with a 16 MiB memory limit whose `dd` asks for 64 MiB once `events` runs:
    the events seen up to the first `oom` one (stats lines left out)."""
    script = "read x; dd if=/dev/zero of=/dev/null bs=64M count=1; exec sleep 1000"
    bundle = rt.bundle("c9", rootfs, ["sh", "-c", script],
                       linux={"resources": {"memory": {"limit": 16 << 20}}})
    read_end, write_end = os.pipe()
    rt.ok("create", "--bundle", str(bundle), "c9", stdin=read_end, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL)
    os.close(read_end)
    rt.ok("start", "c9")
    events = subprocess.Popen([rt.binary, "--root", str(rt.root), "events", "--interval", "1s", "c9"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    seen: list[dict[str, Any]] = []
    try:
        assert events.stdout is not None
        first = json.loads(events.stdout.readline())  # events is watching before dd runs
        assert first["type"] == "stats", first
        os.write(write_end, b"go\n")
        deadline = time.monotonic() + EXIT_TIMEOUT
        while (left := deadline - time.monotonic()) > 0 and select.select([events.stdout], [], [], left)[0]:
            line = events.stdout.readline()
            if not line:
                break  # events ended: the container stopped
            event = json.loads(line)
            if event["type"] != "stats":
                seen.append(event)
                if event["type"] == "oom":
                    break
    finally:
        os.close(write_end)
        events.kill()
        events.wait()
        rt.ok("delete", "--force", "c9")
    return seen


def user_namespace_step(rt: Runtime, rootfs: Path) -> dict[str, Any]:
    """A container with a user namespace of its own (the suite's `linux_uid_mappings`): its maps
    and ids as its init and an exec see them, and the owner, on the host, of a file it makes on a
    host bind (Kabuto's guest makes it through the shared filesystem)."""
    shared = Path(tempfile.mkdtemp(prefix="kbl-userns-", dir="/tmp"))
    try:
        shared.chmod(0o777)  # root in the container is 100000 on the host: runc's mounts need the way in
        rootfs.parent.chmod(0o755)
        script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; touch /run/made; sleep 99"
        bind = {"destination": "/run", "source": str(shared), "options": ["rbind"]}  # runc cannot mkdir
        bundle = rt.bundle("c10", rootfs, ["sh", "-c", script], linux=USER_NAMESPACE, mounts=(bind,))
        with (rt.work / "c10.out").open("wb") as out:
            rt.ok("create", "--bundle", str(bundle), "c10", stdout=out)
        rt.ok("start", "c10")
        made = shared / "made"
        deadline = time.monotonic() + EXIT_TIMEOUT
        while not made.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        exec_out = rt.ok("exec", "--user", "1000:1000", "c10", "sh", "-c",
                         "cat /proc/self/uid_map; id -u").stdout
        seen = {
            "init": [line.split() for line in (rt.work / "c10.out").read_text().splitlines()],
            "exec": [line.split() for line in exec_out.decode().splitlines()],
            "made-by": (made.stat().st_uid, made.stat().st_gid) if made.exists() else None,
        }
        rt.ok("delete", "--force", "c10")
        return seen
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def scenario(rt: Runtime, rootfs: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    seen["state-unknown"] = rt("state", "nosuch").returncode

    # create with inherited stdio and a pid file; the pid stands for the container
    bundle = rt.bundle("c1", rootfs, ["sh", "-c", "read x; echo got $x; echo err >&2; exit 3"])
    read_end, write_end = os.pipe()
    pid_file = rt.work / "c1.pid"
    with (rt.work / "c1.out").open("wb") as out, (rt.work / "c1.err").open("wb") as err:
        rt.ok("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1",
              stdin=read_end, stdout=out, stderr=err)
    os.close(read_end)
    pid = int(pid_file.read_text())
    created = rt.state("c1")
    keys = sorted(k for k in created if k not in ("sandbox", "annotations"))
    seen["created"] = (created["status"], created["pid"] == pid, created["bundle"] == str(bundle),
                       created["rootfs"] == str(rootfs), keys)
    seen["parent-is-caller"] = int(Path(f"/proc/{pid}/stat").read_text().split()[3]) == os.getpid()
    rt.ok("start", "c1")
    seen["start-twice"] = rt("start", "c1").returncode != 0
    os.write(write_end, b"hello\n")
    os.close(write_end)
    seen["c1-exit"] = wait_exit(pid)
    seen["c1-stdio"] = ((rt.work / "c1.out").read_bytes(), (rt.work / "c1.err").read_bytes())
    stopped = rt.state("c1")
    seen["stopped"] = (stopped["status"], stopped["pid"])
    rt.ok("delete", "c1")
    seen["deleted"] = rt("state", "c1").returncode

    # a signal sent to that pid reaches the container's process
    bundle = rt.bundle("c2", rootfs, ["sh", "-c", "trap 'exit 7' TERM; while :; do sleep 1; done"])
    rt.ok("create", "--bundle", str(bundle), "--pid-file", str(rt.work / "c2.pid"), "c2")
    rt.ok("start", "c2")
    pid = int((rt.work / "c2.pid").read_text())
    time.sleep(1)  # the trap is set
    os.kill(pid, signal.SIGTERM)
    seen["c2-exit"] = wait_exit(pid)
    rt.ok("delete", "c2")

    # kill --all, a bad signal; exec --detach into a running container; exec after it stopped
    bundle = rt.bundle("c3", rootfs, SLEEPER)
    rt.ok("create", "--bundle", str(bundle), "--pid-file", str(rt.work / "c3.pid"), "c3")
    rt.ok("start", "c3")
    pid = int((rt.work / "c3.pid").read_text())
    with (rt.work / "e1.out").open("wb") as out:
        rt.ok("exec", "--detach", "--pid-file", str(rt.work / "e1.pid"), "c3",
              "sh", "-c", "echo execout; exit 5", stdout=out)
    seen["exec-exit"] = wait_exit(int((rt.work / "e1.pid").read_text()))
    seen["exec-out"] = (rt.work / "e1.out").read_bytes()
    stats = json.loads(rt.ok("events", "--stats", "c3").stdout)
    data = stats["data"]
    seen["events-stats"] = (stats["type"], stats["id"], data["pids"]["current"] >= 1,
                            data["cpu"]["usage"]["total"] > 0, data["memory"]["usage"]["usage"] > 0)
    processes = json.loads(rt.ok("ps", "--format", "json", "c3").stdout)
    seen["ps-json"] = bool(processes) and all(isinstance(pid, int) for pid in processes)
    seen["exec-not-json"] = rt("exec", "--process", str(rt.work / "c1.out"), "c3").returncode
    seen["kill-bad-signal"] = rt("kill", "c3", "SIGNOPE").returncode
    rt.ok("kill", "--all", "c3", "KILL")
    seen["c3-exit"] = wait_exit(pid)
    seen["exec-stopped"] = rt("exec", "c3", "true").returncode != 0
    rt.ok("delete", "c3")

    # SIGKILL to that pid (it cannot be forwarded): the container is stopped, as when runc's init dies
    bundle = rt.bundle("c6", rootfs, SLEEPER)
    rt.ok("create", "--bundle", str(bundle), "--pid-file", str(rt.work / "c6.pid"), "c6")
    rt.ok("start", "c6")
    pid = int((rt.work / "c6.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    seen["c6-exit"] = wait_exit(pid)
    seen["c6-state"] = (rt.state("c6")["status"], rt.state("c6")["pid"])
    rt.ok("delete", "c6")

    # a terminal: the pty master arrives over the console socket; window size, input, output
    console = ConsoleSocket(rt.work / "console.sock")
    try:
        bundle = rt.bundle("c4", rootfs, ["sh", "-c", "tty; stty size; read x; echo got $x; exit 2"],
                           terminal=True)
        rt.ok("create", "--bundle", str(bundle), "--console-socket", str(console.path),
              "--pid-file", str(rt.work / "c4.pid"), "c4")
        name, master = console.receive()
        pid = int((rt.work / "c4.pid").read_text())
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            rt.ok("start", "c4")
            output = read_until(master, b"30 100")
            os.write(master, b"abc\n")
            output += read_until(master, b"got abc")
            seen["c4-exit"] = wait_exit(pid)
        finally:
            os.close(master)
        seen["c4-console"] = (name, *(line in output for line in (b"/dev/pts/0\r\n", b"30 100\r\n",
                                                                   b"got abc\r\n")))
        rt.ok("delete", "c4")

        # exec --process --tty --console-socket --detach, as conmon runs `podman exec -t`
        bundle = rt.bundle("c5", rootfs, SLEEPER)
        rt.ok("create", "--bundle", str(bundle), "c5")
        rt.ok("start", "c5")
        process = {**json.loads((bundle / "config.json").read_text())["process"],
                   "terminal": True, "args": ["sh", "-c", "tty; exit 6"]}
        (rt.work / "process.json").write_text(json.dumps(process))
        rt.ok("exec", "--process", str(rt.work / "process.json"), "--detach", "--tty", "--console-socket",
              str(console.path), "--pid-file", str(rt.work / "e2.pid"), "c5")
        _, master = console.receive()
        try:
            seen["exec-tty-out"] = read_until(master, b"\n").startswith(b"/dev/pts/")
            seen["exec-tty-exit"] = wait_exit(int((rt.work / "e2.pid").read_text()))
        finally:
            os.close(master)
        rt.ok("delete", "--force", "c5")
    finally:
        console.close()

    # the host cgroup at an absolute and at a relative cgroupsPath
    etc = rt.work / "etc"
    etc.mkdir()
    seen["cgroup-absolute"] = cgroup_step(rt, rootfs, "c7", f"/kbl-{rt.name}-{os.getpid()}", etc)
    seen["cgroup-relative"] = cgroup_step(rt, rootfs, "c8", f"kbl-{rt.name}-{os.getpid()}/c8", etc)

    # the OOM killer in the container's cgroup: `events` reports it as {"type": "oom", "id"}
    seen["oom-event"] = oom_step(rt, rootfs)

    seen["user-namespace"] = user_namespace_step(rt, rootfs)

    # bad input: runc's exit codes, a JSON log line, no container made
    not_a_socket = rt.work / "not-a-socket"
    not_a_socket.write_text("")
    bundle = rt.bundle("bad", rootfs, ["true"], terminal=True)
    refused = {
        "console-not-a-socket": rt("create", "--bundle", str(bundle), "--console-socket", str(not_a_socket),
                                   "b1"),
        "terminal-without-console": rt("create", "--bundle", str(bundle), "b2"),
        "pid-file-in-missing-dir": rt("create", "--bundle", str(rt.bundle("bad2", rootfs, ["true"])),
                                      "--pid-file", str(rt.work / "missing" / "pid"), "b3"),
    }
    for key, done in refused.items():
        seen[key] = (done.returncode, rt.last_log()["level"])
    seen["nothing-made"] = [rt("state", b).returncode for b in ("b1", "b2", "b3")]
    return seen


@pytest.fixture
def rootfs() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="kbl-rootfs-"))
    try:
        yield busybox_rootfs(directory / "rootfs")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_detached_lifecycle_as_runc(rootfs: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc)")
    require_guest_image()
    runc_root, kabuto_root = Path(tempfile.mkdtemp(prefix="kbl-runc-")), new_state_root()
    work = Path(tempfile.mkdtemp(prefix="kbl-", dir="/tmp"))
    try:
        with subreaper():
            (work / "runc").mkdir()
            runc = scenario(Runtime("runc", "runc", runc_root, work / "runc", {}), rootfs)
            (work / "kabuto").mkdir()
            ours = Runtime("kabuto", str(KABUTO), kabuto_root, work / "kabuto",
                           {CONTAINER_TYPE_ANNOTATION: "container", SANDBOX_ID_ANNOTATION: POD})
            # the sandbox's own container at a cgroupsPath: its VMM's vCPU threads join the cpu one
            pod_cgroup = f"/kbl-pod-{os.getpid()}"
            pod = write_bundle(work / "pod", rootfs, SLEEPER,
                               change=lambda spec: spec["linux"].update(cgroupsPath=pod_cgroup))
            ours.ok("create", "--bundle", str(pod), "--pid-file", str(work / "pod.pid"), POD)
            ours.ok("start", POD)
            monitor = int((work / "pod.pid").read_text())
            cpu = host_cgroup(monitor, "cpu")
            # the tasks there but the monitor's own threads: (thread, its process) (v2 moves whole
            # processes only)
            vcpu_threads = [] if CGROUP_V2 else [
                (int(tid), tgid) for tid in (cpu / "tasks").read_text().split()
                if (tgid := thread_group(int(tid))) != monitor]
            try:
                kabuto = scenario(ours, rootfs)
            finally:
                ours("delete", "--force", POD)
                with contextlib.suppress(AssertionError, ChildProcessError):
                    wait_exit(int((work / "pod.pid").read_text()), timeout=30)
            assert not cpu.exists(), f"{cpu} left after delete"
        assert runc["c1-exit"] == 3 and runc["c1-stdio"] == (b"got hello\n", b"err\n"), runc
        assert runc["c2-exit"] == 7 and runc["c3-exit"] == 137 and runc["exec-exit"] == 5, runc
        assert runc["c4-console"][1:] == (True, True, True) and runc["exec-tty-exit"] == 6, runc
        assert runc["cgroup-absolute"]["at-path"] and runc["cgroup-relative"]["removed"] == [False] * 3, runc
        assert runc["cgroup-absolute"]["bind-root-name"] == "etc", runc
        assert runc["oom-event"] == [{"type": "oom", "id": "c9"}], runc
        assert runc["user-namespace"] == {
            "init": [["0", "100000", "65536"], ["0", "200000", "65536"], ["0"], ["0"]],
            "exec": [["0", "100000", "65536"], ["1000"]], "made-by": (100000, 200000)}, runc
        # threads of one other process (the VMM), never its main thread
        assert CGROUP_V2 or (vcpu_threads and len({g for _, g in vcpu_threads}) == 1
                             and all(t != g for t, g in vcpu_threads)), vcpu_threads
        # the one known difference: virtio-fs announces each host mount in the share as a
        # filesystem of its own in the guest (inode numbers stay unique), so a bind's root in the
        # guest's mountinfo is that filesystem's "/", where runc's names the source (the suite's
        # `mounts`; docs/runtime.md); through 9p it ends with the source's name as runc's does
        for key in ("cgroup-absolute", "cgroup-relative"):
            assert kabuto[key].pop("bind-root-name") == "", kabuto[key]
            runc[key].pop("bind-root-name")
        differ = {key: (kabuto.get(key), runc[key]) for key in runc if kabuto.get(key) != runc[key]}
        assert not differ, f"(kabuto, runc) where they differ: {differ}"
        assert_nothing_left(kabuto_root)
    finally:
        remove_state_root(kabuto_root)
        subprocess.run(["runc", "--root", str(runc_root), "list"], capture_output=True, check=False)
        shutil.rmtree(runc_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        # runc removes a relative cgroupsPath's last directory only
        for parent in Path("/sys/fs/cgroup").glob(f"*/kbl-runc-{os.getpid()}"):
            parent.rmdir()
