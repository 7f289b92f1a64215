"""Kubernetes' way in: containerd's CRI plugin runs a pod, driven over CRI's gRPC API (runtime.v1)
with the calls and fields kubelet sends, first with the ``runc`` handler (the baseline: a failure
there is the harness's) and then with ``kabuto`` (the pod is one VM). See cri_harness.py.

One pod per handler, shared by the steps of its lifecycle: RunPodSandbox (hostname, DNS, cgroup
parent, log directory, annotations), PodSandboxStatus, two containers (busybox httpd and a
sidecar), HTTP from the node to the pod IP, localhost between the containers, ExecSync, stats,
UpdateContainerResources, StopContainer with a grace period, the termination message and the
logs after exit, a container restarted in the living pod, StopPodSandbox, RemovePodSandbox; then
nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from containerd_helpers import CONTAINERD, CTR, remove_tree, short_temp_dir, write_unbootable_config
from cri_harness import BUSYBOX_IMAGE, CNI_BIN, GATEWAY, SUBNET_PREFIX, CriHarness, Pod, api
from test_runtime_helpers import require_guest_image

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not (CONTAINERD.is_file() and CTR.is_file()),
                       reason="containerd is not installed (apt-get install containerd)"),
]

HANDLERS = ("runc", "kabuto")
PORT = 8080
DNS_SERVER = "198.18.9.53"
# web: busybox httpd serving the pod's hostname; on SIGTERM it writes a termination message
WEB = (
    "mkdir -p /www; hostname > /www/index.html; echo web-started; echo web-stderr >&2; "
    f"httpd -f -p {PORT} -h /www & pid=$!; "
    "trap 'echo goodbye > /dev/termination-log; kill $pid; exit 0' TERM; wait"
)
# sidecar: ignores SIGTERM, so StopContainer must SIGKILL it once the grace period is over
SIDECAR = "trap '' TERM; echo sidecar-started; while :; do sleep 1; done"
GRACE = 2
# The shim's state root is as long as Kabuto promises to handle (docs/kubernetes.md): with CRI's
# 64-character ids, every socket below it (the shim's, QMP, the agent ports' locks, virtiofsd's)
# must still fit sun_path's 107 bytes.
STATE_ROOT_LENGTH = 60
# a Kabuto handler whose configuration (ConfigPath in its options) names a kernel of garbage
UNBOOTABLE = "kabuto-unbootable"
# hog: one process (awk, exec'd) doubling a string until the container's memory limit stops it
HOG = "exec awk 'BEGIN { s = \"x\"; while (1) s = s s }'"
HOG_LIMIT = 32 * 1024 * 1024
# the kabuto handler's configuration lets the VM grow to this (its ConfigPath)
MAX_MEMORY, MAX_VCPUS = 2048, 2
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriHarness]:
    require_guest_image()
    for binary, package in ((CNI_BIN / "bridge", "containernetworking-plugins"),
                            (Path(shutil.which("runc") or "/nonexistent"), "runc")):
        if not binary.exists():
            pytest.fail(f"{package} is not installed (make deps installs it)")
    base = short_temp_dir("kbt-")
    state_root = base / ("s" * (STATE_ROOT_LENGTH - len(str(base)) - 1))
    state_root.mkdir()
    assert len(str(state_root)) == STATE_ROOT_LENGTH
    directory = short_temp_dir("kbc-")
    configs = Path(tempfile.mkdtemp(prefix="kbt-cri-configs-"))
    unbootable = write_unbootable_config(configs)
    harness = CriHarness(directory, state_root,
                         config_paths={"kabuto": write_resizable_config(configs), UNBOOTABLE: unbootable})
    try:
        harness.start(tmp_path_factory.mktemp("cri-images"))
        yield harness
        harness.remove_all_pods()
        left = harness.wait_until_clean()
        assert not left, "left behind:\n  " + "\n  ".join(left)
    finally:
        harness.close()
        remove_tree(base)
        remove_tree(configs)


def write_resizable_config(directory: Path) -> Path:
    """The built-in configuration with room to grow (up to MAX_MEMORY MiB and MAX_VCPUS vCPUs)
    and the pod's host processes in the pod's cgroup (sandbox_cgroup_only)."""
    default = files("kabuto.config").joinpath("default.toml").read_text()
    resizable = default.replace("default_maxvcpus = 0", f"default_maxvcpus = {MAX_VCPUS}") \
        .replace("default_memory = 0", f"default_memory = 0\ndefault_maxmemory = {MAX_MEMORY}") \
        .replace("[runtime]\n", "[runtime]\nsandbox_cgroup_only = true\n")
    assert f"default_maxvcpus = {MAX_VCPUS}" in resizable and f"default_maxmemory = {MAX_MEMORY}" in resizable
    assert "sandbox_cgroup_only = true" in resizable
    config = directory / "resizable.toml"
    config.write_text(resizable)
    return config


def pod_config(name: str, log_directory: Path, cgroup_parent: str) -> Any:
    """A PodSandboxConfig as kubelet builds it for a pod with one network (POD namespaces)."""
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=secrets.token_hex(8), namespace="default"),
        hostname=name, log_directory=str(log_directory),
        dns_config=api.DNSConfig(servers=[DNS_SERVER], searches=["svc.cluster.local"], options=["ndots:5"]),
        labels={"io.kubernetes.pod.name": name, "app": "kbt"},
        annotations={"kubernetes.io/config.source": "api", "kbt.example/kept": "as given"},
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=api.LinuxSandboxSecurityContext(namespace_options=api.NamespaceOption(
                network=api.POD, pid=api.CONTAINER, ipc=api.POD))))


def container_config(name: str, script: str, mounts: list[Any], attempt: int = 0, memory: int = 0,
                     stdin: bool = False) -> Any:
    """A ContainerConfig as kubelet builds it: log path under the pod's directory, its resources,
    the pod's namespaces, its bind mounts (/etc/hosts, /dev/termination-log)."""
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name, attempt=attempt),
        image=api.ImageSpec(image=BUSYBOX_IMAGE),
        command=["/bin/sh", "-c", script],
        envs=[api.KeyValue(key="POD_CONTAINER", value=name)],
        mounts=mounts, log_path=f"{name}/{attempt}.log", stdin=stdin, stdin_once=stdin,
        labels={"io.kubernetes.container.name": name},
        annotations={"io.kubernetes.container.restartCount": str(attempt)},
        linux=api.LinuxContainerConfig(
            resources=api.LinuxContainerResources(cpu_shares=2, oom_score_adj=1000,
                                                  memory_limit_in_bytes=memory),
            security_context=api.LinuxContainerSecurityContext(namespace_options=api.NamespaceOption(
                network=api.POD, pid=api.CONTAINER, ipc=api.POD))))


def kubelet_mounts(pod_dir: Path, name: str, hosts: Path) -> tuple[list[Any], Path]:
    """The files kubelet bind-mounts into every container: the pod's /etc/hosts and the
    container's own termination-message file (returned too)."""
    termination = pod_dir / "containers" / name / secrets.token_hex(4)
    termination.parent.mkdir(parents=True, exist_ok=True)
    termination.touch()
    return [api.Mount(container_path="/etc/hosts", host_path=str(hosts)),
            api.Mount(container_path="/dev/termination-log", host_path=str(termination))], termination


def cri_log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(stream, tag, message) of each line of a CRI log file ("<RFC 3339 time> <stream> <F|P> <msg>")."""
    lines = []
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\S+) (stdout|stderr) ([FP]) (.*)", line)
        assert match, f"not a CRI log line: {line!r}"
        lines.append(match.group(2, 3, 4))
    return lines


# an HTTP GET from the node's netns (busybox wget -T crashes on this host's kernel, in runc containers too)
GET = ("import sys, urllib.request; "
       "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


def http_get(cri: CriHarness, url: str, timeout: float = 60.0) -> str:
    """GET ``url`` from the node's netns, retried while the server starts."""
    deadline = time.monotonic() + timeout
    while True:
        done = cri.in_host_netns(sys.executable, "-c", GET, url, timeout=30)
        if done.returncode == 0 or time.monotonic() > deadline:
            assert done.returncode == 0, (url, done.stderr)
            return done.stdout
        time.sleep(0.5)


def run_lifecycle(cri: CriHarness, handler: str, base: Path) -> None:
    name = f"kbt-{handler}"
    pod_dir = base / handler
    log_dir = pod_dir / "logs"
    log_dir.mkdir(parents=True)
    hosts = pod_dir / "etc-hosts"
    hosts.write_text(f"127.0.0.1\tlocalhost\n# kubelet-managed\n{SUBNET_PREFIX}99\t{name}\n")
    cgroup_parent = f"/kbt-cri-{secrets.token_hex(4)}"
    config = pod_config(name, log_dir, cgroup_parent)

    pod = cri.run_pod(config, handler)
    try:
        status = cri.call("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
        assert status.state == api.SANDBOX_READY, status
        assert status.runtime_handler == handler
        assert dict(status.annotations) == dict(config.annotations)
        pod_ip = status.network.ip
        assert pod_ip.startswith(SUBNET_PREFIX) and pod_ip != GATEWAY, status
        check_host_cgroup(cri, pod, cgroup_parent)

        web_mounts, web_termination = kubelet_mounts(pod_dir, "web", hosts)
        side_mounts, _ = kubelet_mounts(pod_dir, "sidecar", hosts)
        web = cri.create_container(pod, container_config("web", WEB, web_mounts))
        sidecar = cri.create_container(pod, container_config("sidecar", SIDECAR, side_mounts))
        for container in (web, sidecar):
            assert cri.container_status(container).state == api.CONTAINER_CREATED
            cri.call("StartContainer", api.StartContainerRequest(container_id=container))
            assert cri.container_status(container).state == api.CONTAINER_RUNNING

        # the node reaches the pod's IP; the sidecar reaches the web container over localhost
        assert http_get(cri, f"http://{pod_ip}:{PORT}/") == f"{name}\n"
        local = cri.exec_sync(sidecar, "wget", "-q", "-O-", f"http://127.0.0.1:{PORT}/")
        assert (local.exit_code, local.stdout) == (0, f"{name}\n".encode()), local

        check_exec_sync(cri, web, sidecar, name, hosts)
        check_streaming_exec(cri, sidecar)
        check_attach(cri, pod, log_dir)
        check_stats(cri, pod, web, sidecar)
        check_update(cri, sidecar, vm=handler != "runc")
        check_oom(cri, pod)

        # StopContainer: the sidecar ignores SIGTERM, so it is SIGKILLed after the grace period
        started = time.monotonic()
        cri.call("StopContainer", api.StopContainerRequest(container_id=sidecar, timeout=GRACE))
        assert time.monotonic() - started >= GRACE
        stopped = cri.wait_for_state(sidecar, api.CONTAINER_EXITED)
        assert (stopped.state, stopped.exit_code) == (api.CONTAINER_EXITED, 137), stopped

        # a container restarted in the living pod: a new container (attempt 1) in the same sandbox
        again_mounts, _ = kubelet_mounts(pod_dir, "sidecar", hosts)
        again = cri.create_container(pod, container_config("sidecar", SIDECAR, again_mounts, attempt=1))
        cri.call("StartContainer", api.StartContainerRequest(container_id=again))
        reached = cri.exec_sync(again, "wget", "-q", "-O-", f"http://127.0.0.1:{PORT}/")
        assert (reached.exit_code, reached.stdout) == (0, f"{name}\n".encode()), reached

        # the web container exits on SIGTERM within the grace period, leaving its message
        cri.call("StopContainer", api.StopContainerRequest(container_id=web, timeout=30))
        exited = cri.wait_for_state(web, api.CONTAINER_EXITED)
        assert (exited.state, exited.exit_code) == (api.CONTAINER_EXITED, 0), exited
        assert web_termination.read_text() == "goodbye\n"
        assert exited.log_path == str(log_dir / "web" / "0.log")
        # the logs, in CRI's format, readable after the container exited
        lines = cri_log_lines(log_dir / "web" / "0.log")
        assert ("stdout", "F", "web-started") in lines and ("stderr", "F", "web-stderr") in lines, lines
        assert ("stdout", "F", "sidecar-started") in cri_log_lines(log_dir / "sidecar" / "0.log")
        assert ("stdout", "F", "sidecar-started") in cri_log_lines(log_dir / "sidecar" / "1.log")

        for container in (sidecar, web):
            cri.call("RemoveContainer", api.RemoveContainerRequest(container_id=container))
        listed = cri.call("ListContainers", api.ListContainersRequest(
            filter=api.ContainerFilter(pod_sandbox_id=pod.id))).containers
        assert [c.id for c in listed] == [again]
    finally:
        try:
            cri.remove_pod(pod.id)
            left = cri.wait_until_clean(cgroup_parents=(cgroup_parent,))
        finally:
            remove_cgroup_parent(cgroup_parent)
    assert not left, "left behind:\n  " + "\n  ".join(left)


def remove_cgroup_parent(parent: str) -> None:
    """The pod's cgroup parent, which kubelet makes and removes (runc makes it when missing)."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / parent.lstrip("/")
        if top.is_dir():
            for directory in sorted([top, *(p for p in top.rglob("*") if p.is_dir())],
                                    key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def memory_cgroup(pid: int) -> str:
    """The cgroup (v1 memory hierarchy here, or v2's) process ``pid`` is in."""
    lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    paths = {controllers: path for _, controllers, path in lines}
    return paths.get("memory", paths.get("", ""))


def check_host_cgroup(cri: CriHarness, pod: Pod, cgroup_parent: str) -> None:
    """The pod's host processes run below kubelet's cgroup parent: runc's pause process; Kabuto's
    VMM, virtiofsd and shim (sandbox_cgroup_only)."""
    if pod.handler == "runc":
        request = api.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True)
        info = cri.call("PodSandboxStatus", request).info
        pids = [json.loads(info["info"])["pid"]]
    else:
        pids = [p.pid for p in cri.containerd.shims() + cri.containerd.sandbox_processes()]
        assert len(pids) >= 2, pids  # the shim and QEMU at least
    assert all(memory_cgroup(pid).startswith(f"{cgroup_parent}/") for pid in pids), \
        {pid: memory_cgroup(pid) for pid in pids}


def check_exec_sync(cri: CriHarness, web: str, sidecar: str, name: str, hosts: Path) -> None:
    both = cri.exec_sync(web, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (both.exit_code, both.stdout, both.stderr) == (3, b"out\n", b"err\n"), both
    assert cri.exec_sync(web, "hostname").stdout == f"{name}\n".encode()
    assert cri.exec_sync(sidecar, "cat", "/etc/hosts").stdout == hosts.read_bytes()
    resolv = cri.exec_sync(sidecar, "cat", "/etc/resolv.conf").stdout.decode().splitlines()
    assert f"nameserver {DNS_SERVER}" in resolv and "search svc.cluster.local" in resolv, resolv
    assert "options ndots:5" in resolv, resolv
    env = cri.exec_sync(sidecar, "sh", "-c", "echo $POD_CONTAINER")
    assert env.stdout == b"sidecar\n", env


def check_streaming_exec(cri: CriHarness, sidecar: str) -> None:
    """Exec through containerd's streaming server, as `kubectl exec` reaches it: stdin in, stdout
    and stderr apart, the exit code in the final status."""
    url = cri.call("Exec", api.ExecRequest(container_id=sidecar, stdin=True, stdout=True, stderr=True, cmd=[
        "sh", "-c", "read line; echo got:$line; echo err >&2; exit 7"])).url
    streamed = cri.stream(url, stdin=b"typed\n")
    assert (streamed["stdout"], streamed["stderr"]) == ("got:typed\n", "err\n"), streamed
    status = streamed["status"]
    assert status["status"] == "Failure" and status["details"]["causes"][0]["message"] == "7", status


def check_attach(cri: CriHarness, pod: Pod, log_dir: Path) -> None:
    """Attach through the streaming server to a container that reads its stdin (`kubectl attach
    -i`): what is typed reaches it, its answer comes back and lands in its log too."""
    config = container_config("reader", "read line; echo got:$line", [], stdin=True)
    reader = cri.create_container(pod, config)
    cri.call("StartContainer", api.StartContainerRequest(container_id=reader))
    url = cri.call("Attach", api.AttachRequest(container_id=reader, stdin=True, stdout=True, stderr=True)).url
    attached = cri.stream(url, stdin=b"typed\n")
    assert attached["stdout"] == "got:typed\n", attached
    status = cri.wait_for_state(reader, api.CONTAINER_EXITED)
    assert (status.state, status.exit_code) == (api.CONTAINER_EXITED, 0), status
    assert ("stdout", "F", "got:typed") in cri_log_lines(log_dir / "reader" / "0.log")
    cri.call("RemoveContainer", api.RemoveContainerRequest(container_id=reader))


def check_stats(cri: CriHarness, pod: Pod, web: str, sidecar: str) -> None:
    stats = cri.call("ContainerStats", api.ContainerStatsRequest(container_id=web)).stats
    assert stats.attributes.id == web
    assert stats.memory.working_set_bytes.value > 0, stats
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats
    listed = cri.call("ListContainerStats", api.ListContainerStatsRequest(
        filter=api.ContainerStatsFilter(pod_sandbox_id=pod.id))).stats
    assert sorted(s.attributes.id for s in listed) == sorted([web, sidecar])


# the container's own memory limit: cgroup v2 (its path from /proc/self/cgroup, as the guest has
# no cgroup namespace) or, on this host under runc, cgroup v1's memory hierarchy
MEMORY_LIMIT = ("p=$(sed -n 's/^0:://p' /proc/self/cgroup); "
                "if [ -f /sys/fs/cgroup$p/memory.max ]; then cat /sys/fs/cgroup$p/memory.max; "
                "else cat /sys/fs/cgroup/memory/memory.limit_in_bytes; fi")


def mem_total_kib(cri: CriHarness, container: str) -> int:
    meminfo = cri.exec_sync(container, "cat", "/proc/meminfo").stdout.decode()
    return int(re.search(r"^MemTotal:\s+(\d+) kB$", meminfo, re.M).group(1))  # type: ignore[union-attr]


def online_cpus(cri: CriHarness, container: str) -> str:
    return cri.exec_sync(container, "cat", "/sys/devices/system/cpu/online").stdout.decode().strip()


def check_update(cri: CriHarness, sidecar: str, *, vm: bool) -> None:
    """UpdateContainerResources reaches the container's cgroup; in a VM, the VM grows by the
    new limits (a DIMM the guest onlines: MemTotal grows; a vCPU the agent brings online), and a
    limit beyond default_maxmemory is refused by name."""
    limit = 96 * MIB
    before = mem_total_kib(cri, sidecar)
    cpus_before = online_cpus(cri, sidecar)
    # one CPU's worth of CFS quota, as kubelet sets it for a 1000m limit
    cri.call("UpdateContainerResources", api.UpdateContainerResourcesRequest(
        container_id=sidecar, linux=api.LinuxContainerResources(
            memory_limit_in_bytes=limit, cpu_shares=1024, cpu_quota=100000, cpu_period=100000)))
    seen = cri.exec_sync(sidecar, "sh", "-c", MEMORY_LIMIT)
    assert seen.stdout.decode().strip() == str(limit), seen
    status = cri.container_status(sidecar)
    assert status.resources.linux.memory_limit_in_bytes == limit, status.resources
    after = mem_total_kib(cri, sidecar)
    if not vm:
        assert (after, online_cpus(cri, sidecar)) == (before, cpus_before)  # the node's
        return
    assert after - before >= limit // 1024, (before, after)
    # default_vcpus (1) plus the container's one CPU: a hot-added vCPU the guest brought online
    assert (cpus_before, online_cpus(cri, sidecar)) == ("0", "0-1")
    error = cri.call_error("UpdateContainerResources", api.UpdateContainerResourcesRequest(
        container_id=sidecar, linux=api.LinuxContainerResources(memory_limit_in_bytes=MAX_MEMORY * MIB)))
    assert "default_maxmemory" in error.details(), error.details()
    assert mem_total_kib(cri, sidecar) == after
    assert cri.container_status(sidecar).resources.linux.memory_limit_in_bytes == limit


def check_oom(cri: CriHarness, pod: Pod) -> None:
    """A container over its memory limit is OOM-killed: exit 137, reason OOMKilled (containerd
    learnt it from TaskOOM)."""
    hog = cri.create_container(pod, container_config("hog", HOG, [], memory=HOG_LIMIT))
    cri.call("StartContainer", api.StartContainerRequest(container_id=hog))
    status = cri.wait_for_state(hog, api.CONTAINER_EXITED, timeout=120)
    assert (status.state, status.exit_code, status.reason) == (api.CONTAINER_EXITED, 137, "OOMKilled"), status
    cri.call("RemoveContainer", api.RemoveContainerRequest(container_id=hog))


@pytest.mark.parametrize("handler", HANDLERS)
def test_pod_lifecycle_as_kubelet_drives_it(cri: CriHarness, handler: str, tmp_path: Path) -> None:
    run_lifecycle(cri, handler, tmp_path)


def test_bad_input_is_a_cri_error_naming_the_cause(cri: CriHarness, tmp_path: Path) -> None:
    """What kubelet shows for a pod Kabuto refuses or cannot boot; nothing is left of it (no VMM,
    shim, tap, netns mount, IPAM lease)."""
    cases = {
        # an annotation the configuration does not let pods set (CRI passes io.katacontainers.*)
        "refused": ("kabuto", {"io.katacontainers.config.hypervisor.machine_type": "pc"}, "machine_type"),
        # a sandbox VM that cannot boot: the handler's ConfigPath names a kernel of garbage
        "unbootable": (UNBOOTABLE, {}, "kernel"),
    }
    for name, (handler, refused, cause) in cases.items():
        log_dir = tmp_path / name
        log_dir.mkdir()
        config = pod_config(f"kbt-{name}", log_dir, "")
        config.annotations.update(refused)
        request = api.RunPodSandboxRequest(config=config, runtime_handler=handler)
        error = cri.call_error("RunPodSandbox", request)
        assert cause in error.details(), (name, error.details())
        assert cri.call("ListPodSandbox", api.ListPodSandboxRequest()).items == []
        left = cri.wait_until_clean()
        assert not left, (name, left)
