"""A private containerd for the shim's integration tests (no tests here): start, stop, ctr, leftovers.

containerd runs from Debian's package with everything (root, state, sockets, log) in a temporary
directory, so it never touches /var/lib/containerd or /run/containerd. It finds the shim on the
PATH it hands to shims (the venv's bin first) and passes its environment on, so
KABUTO_STATE_ROOT set here is where the shim keeps its state.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import psutil

CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
NAMESPACE = "kbt"
# every ctr call is bounded; a VM boot under TCG takes seconds, so be generous
CTR_TIMEOUT = 180.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# the shim and its VMM exit shortly after containerd's last delete, not during it
EXIT_TIMEOUT = 30.0
POLL = 0.2
# what the shim's state root may keep between containers: StateStore's lock file and the
# (empty) parents of per-VM and per-shim directories
KEPT_IN_STATE_ROOT = (".lock", ".vm", ".shim")
LOG_TAIL_BYTES = 6000

# Plugins these tests do not need: no CRI (slow, and it would use /var/lib), no /opt/containerd,
# no snapshotters probing for filesystems, no tracing.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def containerd_config(directory: Path) -> str:
    """Config version 2 with root, state and the gRPC socket in ``directory`` (the ttrpc socket
    is derived from it: ``<address>.ttrpc``), at debug level so that shims get ``-debug``."""
    disabled = ", ".join(f'"{name}"' for name in DISABLED_PLUGINS)
    return (
        "version = 2\n"
        f'root = "{directory}/root"\n'
        f'state = "{directory}/state"\n'
        f"disabled_plugins = [{disabled}]\n"
        "[grpc]\n"
        f'  address = "{directory}/containerd.sock"\n'
        "[debug]\n"
        '  level = "debug"\n'
    )


def processes_naming(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes with ``marker`` in an argument of their command line."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in arg for arg in process.info.get("cmdline") or []) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {process.pid} (gone)"


class Containerd:
    """One containerd daemon in ``directory``; shims keep their state in ``state_root``."""

    def __init__(self, directory: Path, state_root: Path, extra_env: dict[str, str] | None = None, *,
                 config: str | None = None, namespace: str = NAMESPACE,
                 launcher: tuple[str, ...] = ()) -> None:
        """``config`` replaces the default configuration; ``launcher`` prefixes containerd's
        command line (``nsenter --net=...``: containerd in a network namespace of its own)."""
        self.directory = directory
        self.state_root = state_root
        self.namespace = namespace
        self.launcher = launcher
        self.address = str(directory / "containerd.sock")
        self.fifo_dir = directory / "fifo"
        self.config_path = directory / "config.toml"
        self.log_path = directory / "containerd.log"
        self.config_path.write_text(config if config is not None else containerd_config(directory))
        self.fifo_dir.mkdir(exist_ok=True)
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "KABUTO_STATE_ROOT": str(state_root),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "containerd is already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, str(CONTAINERD), "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"containerd exited {self.process.returncode}:\n{self.log_tail()}")
            if Path(self.address).exists() and self.ctr("version", timeout=5).returncode == 0:
                return
            time.sleep(POLL)
        self.stop()
        raise AssertionError(f"containerd not serving after {START_TIMEOUT} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; shims outlive it, as in production."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def ctr_command(self, *args: str) -> list[str]:
        return [str(CTR), "--address", self.address, "--namespace", self.namespace, *args]

    def ctr(self, *args: str, input: bytes | None = None,
            timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """``ctr --address SOCK --namespace NS ARGS``; a timeout kills ctr and fails the test."""
        command = self.ctr_command(*args)
        try:
            return subprocess.run(command, input=input, capture_output=True, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s (stdout {exc.stdout!r}, "
                                 f"stderr {exc.stderr!r}):\n{self.log_tail()}") from None

    def run_feeding_stdin(self, *args: str, task_id: str, data: bytes,
                          timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """``ctr ARGS`` (a ``run``) with ``data`` on its stdin, written once ``task_id`` is RUNNING.

        ctr 1.6 sends CloseIO at EOF only if the task exists by then; writing later makes sure
        this path (not only the FIFO's end) is the one exercised.
        """
        command = self.ctr_command(*args)
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr)
            try:
                started = self.wait_for_status(task_id, "RUNNING", timeout=timeout) == "RUNNING"
                assert process.stdin is not None
                if started:
                    process.stdin.write(data)
                process.stdin.close()
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s:\n"
                                     f"{self.log_tail()}") from None
            stdout.seek(0)
            stderr.seek(0)
            return subprocess.CompletedProcess(command, returncode, stdout.read(), stderr.read())

    def check(self, *args: str, input: bytes | None = None,
              timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """Like ``ctr`` but fails the test (with containerd's log) unless ctr exits 0."""
        result = self.ctr(*args, input=input, timeout=timeout)
        assert result.returncode == 0, self.explain(result)
        return result

    def explain(self, result: subprocess.CompletedProcess[bytes]) -> str:
        return (f"{' '.join(map(str, result.args))} exited {result.returncode}\n"
                f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}\n"
                f"containerd's log (tail):\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def task_status(self) -> dict[str, str]:
        """``ctr task ls`` as {task id: status}."""
        lines = self.check("task", "ls").stdout.decode().splitlines()[1:]
        return {fields[0]: fields[2] for fields in (line.split() for line in lines) if len(fields) >= 3}

    def wait_for_status(self, task_id: str, status: str, timeout: float = EXIT_TIMEOUT) -> str:
        """Poll ``ctr task ls`` until the task shows ``status``; returns the last status seen."""
        deadline = time.monotonic() + timeout
        seen = self.task_status().get(task_id, "")
        while seen != status and time.monotonic() < deadline:
            time.sleep(POLL)
            seen = self.task_status().get(task_id, "")
        return seen

    def shims(self) -> list[psutil.Process]:
        """Shim processes serving this containerd (their command line names its address)."""
        return processes_naming(self.address)

    def sandbox_processes(self) -> list[psutil.Process]:
        """Processes other than shims whose command line names the state root: the VMMs and
        their helpers (a virtiofsd per virtio-fs share)."""
        shims = {shim.pid for shim in self.shims()}
        return [p for p in processes_naming(str(self.state_root)) if p.pid not in shims]

    def vmms(self) -> list[psutil.Process]:
        """The sandbox processes that are VMMs: one per VM."""
        return [p for p in self.sandbox_processes() if p.name() != "virtiofsd"]

    def leftovers(self) -> list[str]:
        """Shims, processes naming the state root, mounts below either directory (a rootfs from the
        snapshotter), anything in the state root beyond the lock file and empty parent
        directories, and any container or task containerd still knows."""
        found = [f"shim {describe(p)}" for p in self.shims()]
        found += [f"process {describe(p)}" for p in self.sandbox_processes()]
        with open("/proc/self/mountinfo") as mountinfo:
            points = [line.split()[4] for line in mountinfo]
        found += [f"mount {point}" for point in points
                  if point.startswith((f"{self.state_root}/", f"{self.directory}/"))]
        if self.state_root.exists():
            for path in sorted(self.state_root.rglob("*")):
                relative = path.relative_to(self.state_root)
                if not (len(relative.parts) == 1 and relative.parts[0] in KEPT_IN_STATE_ROOT):
                    found.append(f"path {path}")
        if self.process is not None:
            for kind in ("container", "task"):
                found += [f"{kind} {name}" for name in self.ctr(kind, "ls", "-q").stdout.decode().split()]
        return found

    def wait_until_clean(self, timeout: float = EXIT_TIMEOUT) -> list[str]:
        """Poll until nothing is left (shims and VMMs exit asynchronously); returns what remains."""
        deadline = time.monotonic() + timeout
        remaining = self.leftovers()
        while remaining and time.monotonic() < deadline:
            time.sleep(POLL)
            remaining = self.leftovers()
        return remaining

    def force_clean(self) -> None:
        """After a failed test: delete every task and container, kill what is left, empty the root."""
        if self.process is not None:
            for task in self.ctr("task", "ls", "-q").stdout.decode().split():
                self.ctr("task", "kill", "--signal", "SIGKILL", task, timeout=30)
                self.ctr("task", "delete", "--force", task, timeout=60)
            for container in self.ctr("container", "ls", "-q").stdout.decode().split():
                self.ctr("container", "delete", container, timeout=30)
        for process in processes_naming(self.address) + processes_naming(str(self.state_root)):
            with contextlib.suppress(psutil.Error):
                process.kill()
        remove_tree(self.state_root, keep_root=True)


def remove_tree(root: Path, *, keep_root: bool = False) -> None:
    """Unmount what is mounted below ``root`` (a crashed shim may leave its rootfs share) and
    remove it."""
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo if line.split()[4].startswith(f"{root}/")]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False, timeout=30)
    for child in root.iterdir() if keep_root and root.exists() else ():
        if child.name == ".lock":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if not keep_root:
        shutil.rmtree(root, ignore_errors=True)


def write_oci_archive(rootfs: Path, image_name: str, archive: Path,
                      image_config: dict[str, object] | None = None) -> Path:
    """An OCI image layout tar (one uncompressed layer holding ``rootfs``) that ``ctr image
    import`` accepts: images without a registry, so containerd's snapshotter makes the rootfs.
    ``image_config`` is the image's ``config`` (Env, Entrypoint, Cmd...), by default a shell."""
    blobs: dict[str, bytes] = {}

    def add_blob(data: bytes, media_type: str) -> dict[str, object]:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.iterdir()):
            tar.add(path, arcname=path.name)
    layer_descriptor = add_blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    platform = {"architecture": "amd64", "os": "linux"}
    config = {**platform, "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]},
              "config": image_config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}}
    config_descriptor = add_blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_descriptor, "layers": [layer_descriptor]}
    manifest_descriptor = add_blob(json.dumps(manifest).encode(), manifest["mediaType"])
    index = {"schemaVersion": 2, "manifests": [{
        **manifest_descriptor, "platform": platform,
        "annotations": {"io.containerd.image.name": image_name,
                        "org.opencontainers.image.ref.name": image_name.rsplit(":", 1)[-1]}}]}
    files_in_archive = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                        "index.json": json.dumps(index).encode(),
                        **{f"blobs/sha256/{digest.split(':')[1]}": data for digest, data in blobs.items()}}
    with tarfile.open(archive, mode="w") as tar:
        for name, data in files_in_archive.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def short_temp_dir(prefix: str) -> Path:
    # Unix socket paths hold at most 107 bytes: pytest's tmp_path is too deep for them.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def run_in_pty(command: list[str], *, send: bytes = b"", when: Callable[[], bool] | None = None,
               timeout: float = CTR_TIMEOUT) -> tuple[int, bytes]:
    """Run ``command`` with a pseudo-terminal as stdin, stdout and stderr (``ctr run -t`` makes
    its own stdin the console), typing ``send`` once ``when()`` is true; returns its exit code
    and everything it wrote, bounded."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if send and (when is None or when()):
                os.write(master, send)
                send = b""
            ready, _, _ = select.select([master], [], [], POLL)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the slave side has closed it
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
            raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s: {bytes(output)!r}")
        return process.wait(timeout=STOP_TIMEOUT), bytes(output)
    finally:
        os.close(master)


def write_unbootable_config(directory: Path) -> Path:
    """The built-in configuration with a guest kernel of garbage (and the image's initrd)."""
    from kabuto.image import installed_image

    garbage_kernel = directory / "garbage-vmlinux"
    garbage_kernel.write_bytes(bytes(range(256)) * 64)
    image = installed_image()
    assert image is not None
    default = files("kabuto.config").joinpath("default.toml").read_text()
    unbootable = default.replace('kernel = ""', f'kernel = "{garbage_kernel}"') \
                        .replace('initrd = ""', f'initrd = "{image.initrd}"')
    assert unbootable.count(str(garbage_kernel)) == 1 and unbootable.count(str(image.initrd)) == 1
    config = directory / "unbootable.toml"
    config.write_text(unbootable)
    return config
