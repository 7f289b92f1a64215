"""ContainerService for real, without a VM: the guest agent runs on this host (as root,
in its own mount, UTS and network namespaces) and the host client drives it against a busybox
rootfs. Namespaces, pivot_root, stdio, exit codes and signals are the kernel's own.

After each test nothing may be left: no container, no process under the agent, no mount
of the test's directories in the agent's mount namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kabuto.agent import AgentClient
from kabuto.agent.containers import ContainerCallError, ContainerClient, Storage
from kabuto.errors import AgentError
from kabuto.guest.containers import launcher
from kabuto.guest.containers import syscalls as sc
from kabuto.ttrpc import Code

BUSYBOX = shutil.which("busybox")
UNSHARE = shutil.which("unshare")
AGENT_START_TIMEOUT = 20.0
HOST_HAS_CGROUP2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root"),
    pytest.mark.skipif(BUSYBOX is None, reason="busybox (static) is not installed"),
    pytest.mark.skipif(UNSHARE is None, reason="util-linux unshare is not installed"),
]

ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]
CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def runc_like_spec(rootfs: Path, args: list[str]) -> dict[str, Any]:
    """What `runc spec` writes (runc 1.1), with the process and root filled in."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": list(ENV),
            "cwd": "/",
            "capabilities": {key: list(CAPS) for key in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # pytest makes it 0700: other users in the container need to enter "/"
    (root / "bin").mkdir()
    assert BUSYBOX is not None
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for directory in ("etc", "tmp", "home/guest", "proc", "sys", "dev"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nguest:x:1000:1000::/home/guest:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nguest:x:1000:\n")
    return root


def on_this_host(path: str) -> bool:
    return os.path.lexists(path)


def agent_mounts(pid: int, marker: str) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as mountinfo:
        return [line for line in mountinfo if marker in line]


@pytest.fixture(scope="module")
def agent_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    directory = tmp_path_factory.mktemp("agent")
    socket_path = directory / "agent.sock"
    log = open(directory / "agent.log", "wb")  # closed below
    # --net: the agent brings lo up and configures interfaces in a network namespace of its own
    command = [UNSHARE or "unshare", "--mount", "--uts", "--net", "--propagation", "private", "--"]
    command += [
        sys.executable,
        "-m",
        "kabuto.guest",
        "--listen",
        f"unix://{socket_path}",
        "--log-level",
        "DEBUG",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        while not socket_path.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the agent did not start: {(directory / 'agent.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        yield process, f"unix://{socket_path}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
async def client(
    agent_process: tuple[subprocess.Popen[bytes], str], rootfs: Path, tmp_path: Path
) -> AsyncIterator[ContainerClient]:
    process, address = agent_process
    agent = await AgentClient.connect(address, 5.0, call_timeout=30.0)
    containers = ContainerClient(agent, poll_interval=5.0)
    try:
        yield containers
    finally:
        service_state = await agent_children(process.pid)
        await containers.destroy_sandbox()  # removes whatever a failing test left
        await agent.close()
    assert service_state == [], f"processes left under the agent: {service_state}"
    assert agent_mounts(process.pid, str(tmp_path)) == []
    assert agent_mounts(process.pid, str(rootfs)) == []


async def agent_children(pid: int) -> list[str]:
    """The agent's descendants once the monitors of exited processes are gone (bounded)."""
    for _ in range(100):
        children = []
        for child in psutil.Process(pid).children(recursive=True):
            try:
                children.append(f"{child.pid} {child.name()}")
            except psutil.NoSuchProcess:
                continue  # it exited between the listing and the look: not left behind
        if not children:
            return []
        await asyncio.sleep(0.05)
    return children


async def read_all(client: ContainerClient, container_id: str, exec_id: str, stderr: bool = False) -> bytes:
    read = client.read_stderr if stderr else client.read_stdout
    data = bytearray()
    while chunk := await read(container_id, exec_id, timeout=60):
        data += chunk
    return bytes(data)


async def collect(client: ContainerClient, container_id: str, exec_id: str = "") -> tuple[int, bytes, bytes]:
    out, err, status = await asyncio.gather(
        read_all(client, container_id, exec_id),
        read_all(client, container_id, exec_id, stderr=True),
        client.wait_process(container_id, exec_id, timeout=60),
    )
    return status, out, err


async def run(
    client: ContainerClient, spec: dict[str, Any], container_id: str = "c1"
) -> tuple[int, bytes, bytes]:
    await client.create_container(container_id, spec)
    try:
        await client.start_container(container_id)
        return await collect(client, container_id)
    finally:
        await client.remove_container(container_id)


def sh(rootfs: Path, script: str) -> dict[str, Any]:
    return runc_like_spec(rootfs, ["sh", "-c", script])


# --- the process as runc would run it -----------------------------------------------


async def test_stdout_stderr_and_exit_code_are_separate(client: ContainerClient, rootfs: Path) -> None:
    status, out, err = await run(client, sh(rootfs, "echo out; echo err >&2; exit 3"))
    assert (status, out, err) == (3, b"out\n", b"err\n")


async def test_container_init_is_pid_1_with_the_spec_hostname_env_and_cwd(
    client: ContainerClient, rootfs: Path
) -> None:
    spec = sh(rootfs, "echo $$; hostname; pwd; env | sort")
    spec["process"]["cwd"] = "/work/deep"  # made as runc makes it, read-only root or not
    spec["process"]["env"].append("GREETING=hello world")
    status, out, _ = await run(client, spec)
    lines = out.decode().splitlines()
    assert status == 0
    assert lines[:3] == ["1", "runc", "/work/deep"]
    env = set(lines[3:])
    # The spec's variables, HOME added as runc adds it, and what sh itself sets.
    assert {*ENV, "GREETING=hello world", "HOME=/root"} <= env
    assert {line.partition("=")[0] for line in env} <= {"PATH", "TERM", "GREETING", "HOME", "PWD", "SHLVL"}


async def test_user_groups_and_home(client: ContainerClient, rootfs: Path) -> None:
    spec = sh(rootfs, "id -u; id -g; id -G; echo $HOME; umask")
    spec["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [5, 44]}
    status, out, err = await run(client, spec)
    assert (status, err) == (0, b"")
    assert out.decode().splitlines() == ["1000", "1000", "1000 5 44", "/home/guest", "0022"]
    spec["process"]["user"]["umask"] = 0o077
    assert (await run(client, spec))[1].decode().splitlines()[-1] == "0077"


def with_user_namespace(spec: dict[str, Any]) -> dict[str, Any]:
    spec["linux"]["namespaces"].append({"type": "user"})
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    spec["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    return spec


async def test_a_user_namespace_maps_the_containers_ids(
    client: ContainerClient, rootfs: Path, tmp_path: Path
) -> None:
    """Root in the container is 100000:200000 outside it (its files, its maps), keeps its
    rlimits, and does not own the namespaces the guest's root made (hostname refused even with
    CAP_SYS_ADMIN); an exec joins the user namespace, and an unmapped exec user is named."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    spec = with_user_namespace(sh(
        rootfs, "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; ulimit -n; touch /mnt/data/made; "
                "hostname other 2>/dev/null; echo hostname=$?"))
    spec["mounts"].append({"destination": "/mnt/data", "type": "bind", "source": str(shared),
                           "options": ["rbind"]})
    for key in ("bounding", "effective", "permitted"):
        spec["process"]["capabilities"][key].append("CAP_SYS_ADMIN")
    status, out, err = await run(client, spec)
    assert (status, err) == (0, b"")
    assert [line.split() for line in out.decode().splitlines()] == [
        ["0", "100000", "65536"], ["0", "200000", "65536"], ["0"], ["0"], ["1024"], ["hostname=1"]]
    made = (shared / "made").stat()
    assert (made.st_uid, made.st_gid) == (100000, 200000)

    await client.create_container("c1", with_user_namespace(runc_like_spec(rootfs, ["sleep", "1000"])))
    try:
        await client.start_container("c1")
        process = {"args": ["sh", "-c", "cat /proc/self/uid_map; id -u"], "env": ENV, "cwd": "/",
                   "user": {"uid": 1000, "gid": 1000}}
        await client.exec_process("c1", "e1", process)
        assert await client.wait_process("c1", "e1", timeout=30) == 0
        assert await read_all(client, "c1", "e1") == b"         0     100000      65536\n1000\n"
        with pytest.raises(ContainerCallError) as info:
            await client.exec_process("c1", "e2", {**process, "user": {"uid": 70000, "gid": 0}})
        assert "cannot switch to user 70000:0: Invalid argument (not mapped in the user namespace)" \
            in info.value.message
    finally:
        await client.remove_container("c1")


async def test_rlimits_and_readonly_root(client: ContainerClient, rootfs: Path) -> None:
    spec = sh(rootfs, "ulimit -n; ulimit -s; touch /newfile; echo touched=$?")
    spec["process"]["rlimits"].append({"type": "RLIMIT_STACK", "soft": 4194304, "hard": 4194304})
    status, out, err = await run(client, spec)
    assert status == 0
    assert out.decode().splitlines() == ["1024", "4096", "touched=1"]
    assert b"Read-only file system" in err
    assert not (rootfs / "newfile").exists()


async def test_oci_mounts_masked_and_readonly_paths(
    client: ContainerClient, rootfs: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.txt").write_text("from the guest\n")
    spec = sh(
        rootfs,
        "cat /mnt/data/data.txt; ls /proc/1/ns >/dev/null && echo proc; "
        "echo 1 > /proc/sys/kernel/ns_last_pid; echo sysctl_write=$?; "
        "cat /proc/kcore | wc -c; ls /dev/null /dev/zero /dev/pts/ptmx >/dev/null && echo dev",
    )
    spec["mounts"].append(
        {"destination": "/mnt/data", "type": "bind", "source": str(shared), "options": ["rbind", "ro"]}
    )
    status, out, _ = await run(client, spec)
    assert status == 0
    assert out.decode().splitlines() == ["from the guest", "proc", "sysctl_write=1", "0", "dev"]


async def test_missing_binary_fails_the_create_like_runc(client: ContainerClient, rootfs: Path) -> None:
    with pytest.raises(ContainerCallError) as info:
        await client.create_container("c1", runc_like_spec(rootfs, ["nosuchbin"]))
    assert 'exec: "nosuchbin": executable file not found in $PATH' in info.value.message
    with pytest.raises(ContainerCallError) as info:
        await client.create_container("c1", runc_like_spec(rootfs, ["/bin/nosuchbin"]))
    assert 'exec: "/bin/nosuchbin": stat /bin/nosuchbin: no such file or directory' in info.value.message
    # Nothing remains: the id is free again.
    status, out, _ = await run(client, sh(rootfs, "echo again"))
    assert (status, out) == (0, b"again\n")


async def test_create_waits_for_start(client: ContainerClient, rootfs: Path) -> None:
    pid = await client.create_container("c1", sh(rootfs, "echo started"))
    try:
        assert await client.list_processes("c1") == [pid]
        with pytest.raises(AgentError, match="no answer within"):
            await client.read_stdout("c1", timeout=0.5)
        with pytest.raises(ContainerCallError) as info:
            await client.exec_process("c1", "e1", {"args": ["true"], "cwd": "/"})
        assert info.value.code == Code.FAILED_PRECONDITION
        assert await client.start_container("c1") == pid
        assert await collect(client, "c1") == (0, b"started\n", b"")
        with pytest.raises(ContainerCallError) as info:
            await client.start_container("c1")
        assert info.value.code == Code.FAILED_PRECONDITION
    finally:
        await client.remove_container("c1")


async def test_large_output_arrives_byte_for_byte(client: ContainerClient, rootfs: Path) -> None:
    size = 12 * 1024 * 1024  # far beyond the guest's 1 MiB buffer: back-pressure, no loss
    spec = sh(
        rootfs,
        f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}; yes err | head -c {size // 4} >&2",
    )
    status, out, err = await run(client, spec)
    assert status == 0
    expected = (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * (size // 37 + 1))[:size]
    assert out == expected
    assert err == (b"err\n" * size)[: size // 4]


# --- exec, stdin, signals -------------------------------------------------------------------


async def test_exec_sees_the_container_and_stdin_passes_through(
    client: ContainerClient, rootfs: Path
) -> None:
    await client.create_container("c1", runc_like_spec(rootfs, ["sleep", "1000"]))
    try:
        await client.start_container("c1")
        process = {
            "args": ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; cat"],
            "env": ENV,
            "cwd": "/",
        }
        pid = await client.exec_process("c1", "e1", process)
        assert pid in await client.list_processes("c1")
        payload = os.urandom(3 * 1024 * 1024)
        writing = asyncio.create_task(client.write_stdin("c1", "e1", payload, timeout=60))
        reading = asyncio.create_task(read_all(client, "c1", "e1"))
        assert await writing == len(payload)
        await client.close_stdin("c1", "e1")
        out = await reading
        assert out.startswith(b"sleep 1000 \nrunc\n")
        assert out.removeprefix(b"sleep 1000 \nrunc\n") == payload
        assert await client.wait_process("c1", "e1", timeout=30) == 0

        with pytest.raises(ContainerCallError) as info:
            await client.exec_process("c1", "e2", {"args": ["nosuch"], "env": ENV, "cwd": "/"})
        assert 'exec: "nosuch": executable file not found in $PATH' in info.value.message
        pid = await client.exec_process(
            "c1", "e3", {"args": ["sh", "-c", "kill -9 $$"], "env": ENV, "cwd": "/"}
        )
        assert await collect(client, "c1", "e3") == (137, b"", b"")
        # Waited for and read to the end: the exec'd process is forgotten, its id free again.
        with pytest.raises(ContainerCallError) as info:
            await client.wait_process("c1", "e3", timeout=5)
        assert info.value.code == Code.NOT_FOUND
        await client.exec_process("c1", "e3", {"args": ["true"], "env": ENV, "cwd": "/"})
        assert await client.wait_process("c1", "e3", timeout=30) == 0
    finally:
        await client.remove_container("c1")


async def test_duplicate_exec_id_and_unknown_ids(client: ContainerClient, rootfs: Path) -> None:
    await client.create_container("c1", runc_like_spec(rootfs, ["sleep", "1000"]))
    try:
        await client.start_container("c1")
        await client.exec_process("c1", "e1", {"args": ["sleep", "1000"], "env": ENV, "cwd": "/"})
        with pytest.raises(ContainerCallError) as info:
            await client.exec_process("c1", "e1", {"args": ["true"], "env": ENV, "cwd": "/"})
        assert info.value.code == Code.ALREADY_EXISTS
        with pytest.raises(ContainerCallError) as info:
            await client.create_container("c1", runc_like_spec(rootfs, ["true"]))
        assert info.value.code == Code.ALREADY_EXISTS
        for call in (
            client.wait_process("nope", timeout=5),
            client.signal_process("c1", "nope", signal.SIGTERM),
            client.remove_container("nope"),
        ):
            with pytest.raises(ContainerCallError) as info:
                await call
            assert info.value.code == Code.NOT_FOUND
    finally:
        await client.remove_container("c1")


async def test_pid_1_ignores_signals_it_does_not_handle(client: ContainerClient, rootfs: Path) -> None:
    await client.create_container("c1", runc_like_spec(rootfs, ["sleep", "1000"]))
    try:
        await client.start_container("c1")
        await client.signal_process("c1", "", signal.SIGTERM)  # dropped by the kernel: no handler
        await client.signal_process("c1", "", signal.SIGKILL)
        assert await client.wait_process("c1", timeout=30) == 128 + signal.SIGKILL
        assert await client.wait_process("c1", timeout=30) == 128 + signal.SIGKILL  # asked again
    finally:
        await client.remove_container("c1")


async def test_pid_1_with_a_handler_gets_the_signal(client: ContainerClient, rootfs: Path) -> None:
    await client.create_container(
        "c1", sh(rootfs, "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done")
    )
    try:
        await client.start_container("c1")
        assert await client.read_stdout("c1", timeout=30) == b"ready\n"
        await client.signal_process("c1", "", signal.SIGTERM)
        assert await client.wait_process("c1", timeout=30) == 42
    finally:
        await client.remove_container("c1")


async def test_remove_kills_every_process(client: ContainerClient, rootfs: Path) -> None:
    await client.create_container("c1", sh(rootfs, "sleep 1000 & sleep 1000 & wait"))
    await client.start_container("c1")
    await client.exec_process("c1", "e1", {"args": ["sleep", "1000"], "env": ENV, "cwd": "/"})
    for _ in range(100):
        pids = await client.list_processes("c1")
        if len(pids) == 4:
            break
        await asyncio.sleep(0.05)
    assert len(pids) == 4
    await client.remove_container("c1")
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


async def test_without_a_pid_namespace_remove_still_finds_every_process(
    client: ContainerClient, rootfs: Path
) -> None:
    spec = sh(rootfs, "sleep 1000 & echo $$; wait")
    del spec["hostname"]
    spec["linux"]["namespaces"] = [{"type": "mount"}]
    await client.create_container("c1", spec)
    await client.start_container("c1")
    init_pid = int(await client.read_stdout("c1", timeout=30))
    assert init_pid != 1  # the guest's PID namespace, as runc without "pid"
    for _ in range(100):
        pids = await client.list_processes("c1")
        if len(pids) == 2:
            break
        await asyncio.sleep(0.05)
    assert init_pid in pids and len(pids) == 2
    await client.remove_container("c1")
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


async def test_container_ids_as_namespace_paths_share_that_containers_ipc_uts_and_pid(
    client: ContainerClient, rootfs: Path
) -> None:
    await client.create_container("sandbox", sh(rootfs, "sleep 1000"))
    await client.start_container("sandbox")
    sandbox_pid = (await client.list_processes("sandbox"))[0]
    spec = sh(rootfs, "for n in ipc uts pid; do readlink /proc/self/ns/$n; done; hostname; echo $$")
    spec["hostname"] = "pod"  # as runc: set in the shared UTS namespace
    spec["linux"]["namespaces"] = [{"type": "mount"}, {"type": "network"}] + [
        {"type": kind, "path": "container:sandbox"} for kind in ("ipc", "uts", "pid")
    ]
    await client.create_container("app", spec)
    try:
        await client.start_container("app")
        status, out, err = await collect(client, "app")
        assert status == 0, err
        *links, hostname, pid = out.decode().split()
        assert links == [os.readlink(f"/proc/{sandbox_pid}/ns/{kind}") for kind in ("ipc", "uts", "pid")]
        assert hostname == "pod" and pid != "1"  # the sandbox's init is PID 1 of that namespace
        # an exec joins them too, through the container's own init
        spec["process"]["args"] = ["sleep", "1000"]
        await client.create_container("app2", spec)
        await client.start_container("app2")
        readlink = {"args": ["readlink", "/proc/self/ns/pid"], "env": ENV, "cwd": "/"}
        await client.exec_process("app2", "e1", readlink)
        # output first: collect's reads may race the wait that forgets an exec with output
        out = await read_all(client, "app2", "e1")
        assert (await client.wait_process("app2", "e1", timeout=60), out.decode().strip()) == (0, links[2])
    finally:
        for container_id in ("app2", "app", "sandbox"):
            with contextlib.suppress(ContainerCallError):
                await client.remove_container(container_id)


@pytest.mark.parametrize(
    ("namespace", "code", "words"),
    [
        ({"type": "ipc", "path": "container:nope"}, Code.NOT_FOUND, "container 'nope', whose ipc namespace"),
        ({"type": "mount", "path": "container:sandbox"}, Code.INVALID_ARGUMENT, "by path (mount)"),
        ({"type": "uts", "path": "/proc/1/ns/uts"}, Code.INVALID_ARGUMENT, "by path (uts)"),
        ({"type": "pid", "path": "container:../x"}, Code.INVALID_ARGUMENT, "path's id"),
    ],
)
async def test_bad_namespace_paths_are_refused(
    client: ContainerClient, rootfs: Path, namespace: dict[str, str], code: Code, words: str
) -> None:
    spec = sh(rootfs, "true")
    spec["linux"]["namespaces"] = [{"type": "mount"}, namespace]
    del spec["hostname"]
    with pytest.raises(ContainerCallError) as caught:
        await client.create_container("c1", spec)
    assert caught.value.code == code and words in caught.value.message, caught.value.message


async def read_until(client: ContainerClient, container_id: str, exec_id: str, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = await client.read_stdout(container_id, exec_id, timeout=30)
        assert chunk, f"end of output before {end!r}: {data!r}"
        data += chunk
    return data


async def test_terminal(client: ContainerClient, rootfs: Path) -> None:
    """As runc: the pty comes from the container's own devpts, so tty names /dev/pts/N
    there, and init's terminal is also its /dev/console."""
    spec = sh(rootfs, "tty; [ /dev/console -ef /dev/pts/0 ] && echo console; "
                      "stty size; read line; stty size; echo got $line")
    spec["process"]["terminal"] = True
    spec["process"]["consoleSize"] = {"height": 30, "width": 100}
    await client.create_container("c1", spec)
    try:
        await client.start_container("c1")
        assert await read_until(client, "c1", "", b"100\r\n") == b"/dev/pts/0\r\nconsole\r\n30 100\r\n"

        process = {
            "args": ["sh", "-c", "tty; stty size; read line; stty size"],
            "env": ENV,
            "cwd": "/",
            "terminal": True,
            "consoleSize": {"height": 20, "width": 70},
        }
        await client.exec_process("c1", "e1", process)
        assert await read_until(client, "c1", "e1", b"70\r\n") == b"/dev/pts/1\r\n20 70\r\n"
        await client.tty_win_resize("c1", "e1", 25, 90)
        await client.write_stdin("c1", "e1", b"go\n")
        assert await read_until(client, "c1", "e1", b"90\r\n") == b"go\r\n25 90\r\n"  # echoed, then stty
        assert await client.wait_process("c1", "e1", timeout=30) == 0

        await client.tty_win_resize("c1", "", 40, 120)
        await client.write_stdin("c1", "", b"hi\n")
        status, out, err = await collect(client, "c1")
        assert (status, err) == (0, b"")
        assert out.replace(b"\r\n", b"\n") == b"hi\n40 120\ngot hi\n"  # the tty echoes the input
    finally:
        await client.remove_container("c1")


async def test_a_terminal_without_ptmx_fails_like_runc_and_leaves_nothing(
    client: ContainerClient, rootfs: Path
) -> None:
    spec = sh(rootfs, "tty")
    spec["process"]["terminal"] = True
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/pts"]
    with pytest.raises(ContainerCallError) as info:
        await client.create_container("c1", spec)
    assert info.value.code == Code.FAILED_PRECONDITION
    assert info.value.message.startswith(
        "unable to start container process: cannot open the container's /dev/ptmx"
    )
    with pytest.raises(ContainerCallError) as info:
        await client.wait_process("c1", timeout=5)
    assert info.value.code == Code.NOT_FOUND


# --- sandbox, storages, files -------------------------------------------------------------


async def test_sandbox_storages_and_a_rootfs_storage(
    client: ContainerClient, agent_process: tuple[subprocess.Popen[bytes], str], rootfs: Path, tmp_path: Path
) -> None:
    agent_pid = agent_process[0].pid
    shared = str(tmp_path / "shared")  # in the agent's mount namespace only
    await client.create_sandbox(
        hostname="kabuto-test", storages=[Storage("tmpfs", shared, "tmpfs", ["size=1m", "mode=755"])]
    )
    assert agent_mounts(agent_pid, shared)
    await client.copy_file_in(f"{shared}/note", b"note\n", 0o600)
    assert await client.copy_file_out(f"{shared}/note") == b"note\n"

    spec = sh(Path(shared) / "rootfs", "hostname; head -1 /etc/passwd")
    del spec["hostname"]  # no UTS namespace of its own: the sandbox's hostname
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "mount")]
    rootfs_storage = Storage(str(rootfs), f"{shared}/rootfs", "none", ["bind", "ro"])
    await client.create_container("c1", spec, rootfs=rootfs_storage)
    try:
        with pytest.raises(ContainerCallError, match="Read-only file system"):
            await client.copy_file_in("/hello", b"hi\n", container_id="c1")
        await client.start_container("c1")
        assert await collect(client, "c1") == (0, b"kabuto-test\nroot:x:0:0:root:/root:/bin/sh\n", b"")
    finally:
        await client.remove_container("c1")
    assert agent_mounts(agent_pid, f"{shared}/rootfs") == []
    await client.destroy_sandbox()
    assert agent_mounts(agent_pid, shared) == []


async def test_copy_files_in_and_out_of_a_container(
    client: ContainerClient, rootfs: Path, tmp_path: Path
) -> None:
    spec = sh(rootfs, "cat /tmp/in.bin | wc -c; sleep 1000")
    spec["mounts"].append(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=16m"]}
    )
    await client.create_container("c1", spec)
    try:
        await client.start_container("c1")  # /tmp is the container's own tmpfs from here on
        payload = os.urandom(2 * 1024 * 1024 + 5)
        escape = f"/tmp/kabuto-escape-{os.getpid()}"  # named so on this host: it must not appear here
        await client.copy_file_in("/tmp/in.bin", payload, 0o640, container_id="c1")
        assert await client.copy_file_out("/tmp/in.bin", container_id="c1") == payload
        await client.copy_file_in("/tmp/new/dir/file.txt", b"deep\n", container_id="c1")
        assert await client.copy_file_out("/tmp/new/dir/file.txt", container_id="c1") == b"deep\n"
        pid = await client.exec_process(
            "c1",
            "e1",
            {"args": ["sh", "-c", f"ln -s /../../../..{escape} /tmp/link"], "env": ENV, "cwd": "/"},
        )
        assert pid and await client.wait_process("c1", "e1", timeout=30) == 0
        # A symlink cannot lead out of the container's root: this lands in its /tmp.
        await client.copy_file_in("/tmp/link", b"inside\n", container_id="c1")
        assert await client.copy_file_out(escape, container_id="c1") == b"inside\n"
        assert not on_this_host(escape)
        with pytest.raises(AgentError, match="larger than"):
            await client.copy_file_out("/tmp/in.bin", container_id="c1", max_size=1024)
        with pytest.raises(ContainerCallError) as info:
            await client.copy_file_out("/tmp/missing", container_id="c1")
        assert info.value.code == Code.NOT_FOUND
    finally:
        await client.remove_container("c1")


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.__setitem__("process", None), "process"),
        (lambda s: s["linux"].__setitem__("seccomp", {"defaultAction": "SCMP_ACT_ALLOW"}), "linux.seccomp"),
        (lambda s: s.__setitem__("hooks", {"prestart": [{"path": "/bin/true"}]}), "hooks"),
        (lambda s: s["linux"]["namespaces"].append({"type": "user"}), "needs linux.uidMappings"),
        (lambda s: s["mounts"].append({"destination": "/x", "type": "nfs", "source": "h:/"}), "'nfs'"),
        (lambda s: s["root"].__setitem__("path", "/nonexistent/rootfs"), "does not exist"),
        (
            lambda s: s["process"]["rlimits"].append({"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}),
            "RLIMIT_BOGUS",
        ),
        (lambda s: s["process"]["capabilities"]["bounding"].append("CAP_BOGUS"), "CAP_BOGUS"),
        (lambda s: s["process"].__setitem__("cwd", "relative"), "absolute"),
    ],
)
async def test_bad_specs_are_refused_and_leave_nothing(
    client: ContainerClient, rootfs: Path, mutate: Any, message: str
) -> None:
    spec = copy.deepcopy(runc_like_spec(rootfs, ["true"]))
    mutate(spec)
    with pytest.raises(ContainerCallError, match="CreateContainer") as info:
        await client.create_container("c1", spec)
    assert message in info.value.message
    with pytest.raises(ContainerCallError):
        await client.remove_container("c1")


async def test_invalid_json_and_ids(client: ContainerClient, rootfs: Path) -> None:
    with pytest.raises(ContainerCallError, match="JSON is invalid"):
        await client.create_container("c1", b"{not json")
    for bad_id in ("", "../escape", "a" * 200, ".hidden"):
        with pytest.raises(ContainerCallError) as info:
            await client.create_container(bad_id, runc_like_spec(rootfs, ["true"]))
        assert info.value.code == Code.INVALID_ARGUMENT


async def test_cgroup_limits_without_cgroup_v2_are_refused(client: ContainerClient, rootfs: Path) -> None:
    if HOST_HAS_CGROUP2:
        pytest.skip("this host has cgroup v2 at /sys/fs/cgroup: the limit would apply")
    spec = runc_like_spec(rootfs, ["true"])
    spec["linux"]["resources"]["memory"] = {"limit": 64 * 1024 * 1024}
    with pytest.raises(ContainerCallError, match=r"memory\.max.*no cgroup v2"):
        await client.create_container("c1", spec)
    spec = runc_like_spec(rootfs, ["sleep", "1000"])
    await client.create_container("c1", spec)
    try:
        stats = await client.stats_container("c1")
        assert stats.memory_usage_bytes is None and stats.pids_current is None
    finally:
        await client.remove_container("c1")


async def test_long_polls_come_back_without_losing_data(client: ContainerClient, rootfs: Path) -> None:
    # Polls of 1 s: the guest answers DEADLINE_EXCEEDED before each runs out, the client asks again.
    polling = ContainerClient(client.agent, poll_interval=1.0)
    await polling.create_container("c1", sh(rootfs, "sleep 2; echo late"))
    try:
        await polling.start_container("c1")
        assert await polling.read_stdout("c1", timeout=30) == b"late\n"
        assert await polling.wait_process("c1", timeout=30) == 0
    finally:
        await polling.remove_container("c1")
    with contextlib.suppress(Exception):
        await polling.remove_container("c1")


# --- the initramfs fallback ------------------------------------------------------------------


def test_without_pivot_root_the_agents_mounts_are_detached(tmp_path: Path) -> None:
    """In the guest the agent's root is the initramfs, which pivot_root refuses: the rootfs is
    moved over "/" instead, and every mount of the agent must leave the container's namespace
    (they would hang below its root, for a chroot escape to find). Checked here in a forked
    child with a mount namespace of its own: the host's mounts play the agent's."""
    agent_mount, rootfs = tmp_path / "agent-mount", tmp_path / "rootfs"
    agent_mount.mkdir()
    rootfs.mkdir()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            sc.mount("tmpfs", str(agent_mount), "tmpfs")
            (agent_mount / "secret").write_text("another container's file")
            sc.mount("tmpfs", str(rootfs), "tmpfs")
            (rootfs / "in-rootfs").write_text("")
            os.chdir(rootfs)
            sc.mount(str(rootfs), "/", None, sc.MS_MOVE)
            launcher._detach_agent_mounts()
            gone = not os.path.exists(agent_mount / "secret")
            os.chroot(".")
            code = 0 if gone and os.path.exists("/in-rootfs") else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
