"""A private containerd with its CRI plugin, driven over CRI's gRPC API as kubelet drives it (no
tests here).

containerd (Debian's 1.6) runs with its root, state, socket and CRI configuration in a temporary
directory and inside a network namespace standing for the node, so the CNI bridge it makes never
touches the machine's own network. The CRI configuration has two runtime handlers: ``runc``
(``io.containerd.runc.v2``, the baseline) and ``kabuto`` (``io.containerd.kabuto.v2``, found on
the PATH containerd hands to shims: this interpreter's venv first, so the worktree's own shim).
CNI is Debian's containernetworking-plugins (bridge + host-local on a private range); pod netns
mounts live under containerd's state directory. Images are built here as OCI archives and
imported offline (``ctr -n k8s.io images import``): a busybox image, and a pause image (busybox
sleeping) as the ``sandbox_image``.

The client is generated at import time from tests/integration/cri/runtime_v1.proto (CRI's
runtime.v1 messages and field numbers) with grpcio-tools.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from containerd_helpers import DISABLED_PLUGINS, Containerd, remove_tree, write_oci_archive
from grpc_tools import protoc

from kabuto.runtime.busybox import make_busybox_rootfs

PROTO = Path(__file__).parent / "cri" / "runtime_v1.proto"
CNI_BIN = Path("/usr/lib/cni")
CRI_NAMESPACE = "k8s.io"
KABUTO_RUNTIME = "io.containerd.kabuto.v2"
BUSYBOX_IMAGE = "docker.io/kabuto/busybox:cri"
PAUSE_IMAGE = "docker.io/kabuto/pause:cri"
NETWORK_NAME = "kbt-pods"
BRIDGE = "kbtcri0"
SUBNET_PREFIX = "198.18.9."
SUBNET = f"{SUBNET_PREFIX}0/24"
GATEWAY = f"{SUBNET_PREFIX}1"
# every CRI call is bounded; RunPodSandbox boots a VM under TCG, so be generous
CALL_TIMEOUT = 240.0
POLL = 0.2
COMMAND_TIMEOUT = 60.0
# the pause container: sleeps until killed (CRI stops a sandbox with SIGKILL)
PAUSE_COMMAND = ["/bin/sleep", "2147483647"]


def _generate_client() -> tuple[ModuleType, ModuleType]:
    """runtime_v1_pb2 and runtime_v1_pb2_grpc, generated from the .proto into a temporary
    directory (gone once they are imported)."""
    with tempfile.TemporaryDirectory(prefix="kbt-cri-gen-") as out:
        status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                              f"--grpc_python_out={out}", str(PROTO)])
        if status != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({status}) on {PROTO}")
        sys.path.insert(0, out)
        try:
            return importlib.import_module("runtime_v1_pb2"), importlib.import_module("runtime_v1_pb2_grpc")
        finally:
            sys.path.remove(out)


api, api_grpc = _generate_client()


def cri_config(directory: Path, cni_conf_dir: Path, config_paths: dict[str, Path]) -> str:
    """containerd config version 2 with the CRI plugin on, two runtime handlers, CNI and
    the pause image; everything under ``directory``. ``config_paths``: more Kabuto handlers,
    each with the Kabuto configuration its options name (``ConfigPath``, as Kata's); "kabuto"
    there gives the ``kabuto`` handler its ConfigPath."""
    disabled = ", ".join(f'"{name}"' for name in DISABLED_PLUGINS if name != "io.containerd.grpc.v1.cri")
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{directory}/root"
state = "{directory}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{directory}/containerd.sock"

[debug]
  level = "debug"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # this machine refuses a lower oom_score_adj than containerd's own (the pause container asks for -998)
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.kabuto]
  runtime_type = "{KABUTO_RUNTIME}"
  pod_annotations = ["io.katacontainers.*"]
  container_annotations = ["io.katacontainers.*"]
  privileged_without_host_devices = true

[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf_dir}"
  max_conf_num = 1
""" + "".join(_handler_options(cri, name, path) for name, path in config_paths.items())


def _handler_options(cri: str, name: str, path: Path) -> str:
    """A Kabuto handler with its ConfigPath (the ``kabuto`` handler exists already: only its options)."""
    section = f"[{cri}.containerd.runtimes.{name}]\n  runtime_type = \"{KABUTO_RUNTIME}\"\n"
    return ("" if name == "kabuto" else section) + \
        f"[{cri}.containerd.runtimes.{name}.options]\n  ConfigPath = \"{path}\"\n"


def cni_conflist(ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": NETWORK_NAME,
        "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "subnet": SUBNET, "routes": [{"dst": "0.0.0.0/0"}],
                              "dataDir": str(ipam_dir)}}],
    }


# A client of containerd's streaming server (Exec/Attach URLs), run in the node's netns where the
# server listens: WebSocket with Kubernetes' v4.channel.k8s.io framing (each binary message starts
# with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the final status as JSON). Reads what to send on
# stdin from its own stdin; prints {"stdout", "stderr", "status"} as JSON.
STREAM_CLIENT = """
import json, sys
from websockets.sync.client import connect
out = {"stdout": "", "stderr": "", "status": None}
url = "ws" + sys.argv[1].removeprefix("http")
with connect(url, subprotocols=["v4.channel.k8s.io"], open_timeout=30, close_timeout=5) as ws:
    data = sys.stdin.buffer.read()
    if data:
        ws.send(b"\\x00" + data)
    for message in ws:
        channel, payload = message[0], message[1:].decode()
        if channel == 1: out["stdout"] += payload
        elif channel == 2: out["stderr"] += payload
        elif channel == 3: out["status"] = json.loads(payload)
print(json.dumps(out))
"""


def run(*args: str, timeout: float = COMMAND_TIMEOUT) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}: {done.stderr or done.stdout}"
    return done.stdout


@dataclass
class Pod:
    """A pod sandbox the harness ran: its id, the config it was run with, its handler."""

    id: str
    config: Any  # api.PodSandboxConfig
    handler: str


class CriHarness:
    """containerd with CRI in ``directory`` (a short path: sockets live below it)."""

    def __init__(self, directory: Path, state_root: Path, *, extra_env: dict[str, str] | None = None,
                 config_paths: dict[str, Path] | None = None) -> None:
        self.directory = directory
        self.host_netns = f"kbh-{secrets.token_hex(4)}"
        self.cni_conf_dir = directory / "cni"
        self.ipam_dir = directory / "ipam"
        self.cni_conf_dir.mkdir()
        (self.cni_conf_dir / "10-kbt.conflist").write_text(json.dumps(cni_conflist(self.ipam_dir)))
        config = cri_config(directory, self.cni_conf_dir, config_paths or {})
        self.containerd = Containerd(directory, state_root, extra_env, config=config, namespace=CRI_NAMESPACE,
                                     launcher=("nsenter", f"--net=/run/netns/{self.host_netns}"))
        self.channel: grpc.Channel | None = None
        self.runtime: Any = None
        self.images: Any = None

    # -- lifetime ----------------------------------------------------------------------------
    def start(self, image_dir: Path) -> None:
        run("ip", "netns", "add", self.host_netns)
        run("ip", "-n", self.host_netns, "link", "set", "lo", "up")
        self.containerd.start()
        self.channel = grpc.insecure_channel(f"unix://{self.containerd.address}")
        self.runtime = api_grpc.RuntimeServiceStub(self.channel)
        self.images = api_grpc.ImageServiceStub(self.channel)
        self.import_images(image_dir)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.containerd.stop()

    def close(self) -> None:
        """After stop (or a failure): kill what is left, delete the netns and the directory."""
        self.stop()
        self.containerd.force_clean()
        for mount in self.netns_mounts():
            subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=COMMAND_TIMEOUT)
        subprocess.run(["ip", "netns", "del", self.host_netns], capture_output=True, timeout=COMMAND_TIMEOUT)
        remove_tree(self.directory)
        remove_tree(self.containerd.state_root)

    def import_images(self, image_dir: Path) -> None:
        """The busybox and pause images, as OCI archives built here, imported into CRI's namespace."""
        rootfs = make_busybox_rootfs(image_dir / "rootfs")
        images = {
            BUSYBOX_IMAGE: {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            PAUSE_IMAGE: {"Env": ["PATH=/bin"], "Entrypoint": PAUSE_COMMAND},
        }
        for index, (name, config) in enumerate(images.items()):
            archive = write_oci_archive(rootfs, name, image_dir / f"image-{index}.tar", config)
            self.containerd.check("images", "import", str(archive))
            status = self.images.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=name)),
                                             timeout=CALL_TIMEOUT)
            assert name in status.image.repo_tags, (name, status)

    # -- CRI calls ---------------------------------------------------------------------------
    def call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """``RuntimeService.<method>(request)``; a gRPC error fails the test with containerd's log."""
        try:
            return getattr(self.runtime, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise AssertionError(f"CRI {method} failed: {exc.code()}: {exc.details()}\n"
                                 f"containerd's log (tail):\n{self.containerd.log_tail()}") from None

    def call_error(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> grpc.RpcError:
        """The gRPC error ``method`` must end with."""
        try:
            getattr(self.runtime, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"CRI {method} succeeded, but should have failed")

    def run_pod(self, config: Any, handler: str) -> Pod:
        request = api.RunPodSandboxRequest(config=config, runtime_handler=handler)
        response = self.call("RunPodSandbox", request)
        return Pod(response.pod_sandbox_id, config, handler)

    def create_container(self, pod: Pod, config: Any) -> str:
        response = self.call("CreateContainer", api.CreateContainerRequest(
            pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config))
        return response.container_id

    def container_status(self, container_id: str) -> Any:
        return self.call("ContainerStatus", api.ContainerStatusRequest(container_id=container_id)).status

    def wait_for_state(self, container_id: str, state: int, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        status = self.container_status(container_id)
        while status.state != state and time.monotonic() < deadline:
            time.sleep(POLL)
            status = self.container_status(container_id)
        return status

    def exec_sync(self, container_id: str, *cmd: str, timeout: int = 60) -> Any:
        return self.call("ExecSync", api.ExecSyncRequest(container_id=container_id, cmd=list(cmd),
                                                         timeout=timeout), timeout=timeout + CALL_TIMEOUT)

    def stream(self, url: str, stdin: bytes = b"", timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """Drive an Exec or Attach URL of containerd's streaming server (see STREAM_CLIENT)."""
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.host_netns}", sys.executable, "-c",
                               STREAM_CLIENT, url], input=stdin, capture_output=True, timeout=timeout)
        assert done.returncode == 0, f"streaming client for {url}: {done.stderr.decode(errors='replace')}"
        return json.loads(done.stdout)

    def remove_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self.call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_all_pods(self) -> None:
        """After a failed test: every pod CRI still knows is stopped and removed (best effort)."""
        if self.runtime is None:
            return
        with contextlib.suppress(grpc.RpcError):
            for pod in self.runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=CALL_TIMEOUT).items:
                with contextlib.suppress(grpc.RpcError):
                    self.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                                timeout=CALL_TIMEOUT)
                    self.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                                  timeout=CALL_TIMEOUT)

    # -- the node's side ---------------------------------------------------------------------
    def in_host_netns(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a command in the network namespace standing for the node (where the bridge is)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.host_netns}", *args], capture_output=True,
                              text=True, timeout=timeout)

    def netns_mounts(self) -> list[str]:
        """Pod netns files CRI mounted under its state directory."""
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        return [p for p in points if p.startswith(f"{self.directory}/state/") and "/netns/" in p]

    def host_links(self) -> list[str]:
        links = json.loads(self.in_host_netns("ip", "-j", "link").stdout or "[]")
        return sorted(link["ifname"] for link in links)

    def ipam_leases(self) -> list[str]:
        """host-local's reserved addresses (files named by address) still held."""
        network = self.ipam_dir / NETWORK_NAME
        return sorted(p.name for p in network.glob(f"{SUBNET_PREFIX}*")) if network.is_dir() else []

    def leftovers(self, cgroup_parents: tuple[str, ...] = ()) -> list[str]:
        """What a removed pod must not leave: containerd's containers and tasks, shims, VMMs, mounts
        (rootfs, netns), files under the shim's state root, links in the node netns beyond lo and the
        bridge, IPAM leases, and the pods' cgroups (below each given parent, in every hierarchy)."""
        found = self.containerd.leftovers()  # mounts below the directory: rootfs and netns alike
        extra_links = [link for link in self.host_links() if link not in ("lo", BRIDGE)]
        found += [f"link {link} in {self.host_netns}" for link in extra_links]
        found += [f"ipam lease {lease}" for lease in self.ipam_leases()]
        for parent in cgroup_parents:
            for hierarchy in Path("/sys/fs/cgroup").iterdir():
                below = hierarchy / parent.lstrip("/")
                if below.is_dir():
                    found += [f"cgroup {p}" for p in below.rglob("*") if p.is_dir()]
        return found

    def wait_until_clean(self, cgroup_parents: tuple[str, ...] = (), timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        remaining = self.leftovers(cgroup_parents)
        while remaining and time.monotonic() < deadline:
            time.sleep(POLL)
            remaining = self.leftovers(cgroup_parents)
        return remaining
