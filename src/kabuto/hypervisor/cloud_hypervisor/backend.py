"""Cloud Hypervisor: spawn ``cloud-hypervisor --api-socket`` and drive its REST API (/api/v1/...)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Self

import httpx

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, Hypervisor, HypervisorState, VcpuThreadIds, VmStatus
from kabuto.hypervisor.cloud_hypervisor.plugin import CAPABILITIES
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
)
from kabuto.hypervisor.vmm_process import (
    ApiClient,
    VmmProcess,
    check_socket_path,
    device_from_dict,
    device_to_dict,
    hybrid_vsock_url,
    netns_prefix,
    unlink_quietly,
    vcpu_thread_ids,
)

API = "/api/v1"
AGENT_PORT = 1024
GUEST_CID = 3
MIB = 1 << 20
VIRTIO_BLK_SERIAL_MAX = 20
#: how long a guest gets to power off after vm.shutdown before the VMM is stopped
SHUTDOWN_GRACE = 5.0
#: bound on a virtiofsd started for a hot-plugged share to open its socket
DAEMON_START_TIMEOUT = 10.0
_VCPU_THREAD = re.compile(r"vcpu(\d+)")
_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def describe_error(response: httpx.Response) -> str:
    """Cloud Hypervisor answers errors with a JSON array: the error chain, root cause last."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or "(empty body)"
    if isinstance(body, list):
        return ": ".join(str(item) for item in body)
    return json.dumps(body)


class CloudHypervisor(Hypervisor):
    name = "cloud-hypervisor"
    capabilities = CAPABILITIES

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT) -> None:
        super().__init__(config, jailer_root)
        self._vmm: VmmProcess | None = None
        self._api: ApiClient | None = None
        # what start_vm was doing, for a timeout's message
        self._stage = "not started"
        # device id -> the virtiofsd serving it
        self._virtiofsd: dict[str, VmmProcess] = {}

    # -- paths ------------------------------------------------------------------------------
    @property
    def api_socket(self) -> Path:
        return self.vm_path / "ch-api.sock"

    @property
    def vsock_socket(self) -> Path:
        return self.vm_path / "ch-vm.sock"

    @property
    def snapshot_dir(self) -> Path:
        return self.vm_path / "snapshot"

    def _fs_socket(self, device: SharedFsDevice) -> Path:
        return self.vm_path / f"fs-{device.id}.sock"

    # -- lifecycle --------------------------------------------------------------------------
    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self._require(VmStatus.NEW, operation="prepare the VM")
        if not _ID_OK.fullmatch(id):
            raise self._error(f"invalid VM id {id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        self.id = id
        self.netns = netns
        for path in (self.api_socket, self.vsock_socket):
            check_socket_path(self.name, path)
        self.vm_path.mkdir(parents=True, exist_ok=False, mode=0o750)
        self.pending_devices.append(
            AgentChannel(
                id="agent",
                channel=ChannelKind.HYBRID_VSOCK,
                socket_path=self.vsock_socket,
                guest_cid=GUEST_CID,
                port=AGENT_PORT,
            )
        )
        self.status = VmStatus.PREPARED

    async def add_device(self, device: AnyDevice) -> AnyDevice:
        # Refuse what this VMM can never do, also before boot, so the runtime learns early.
        if device.kind == DeviceKind.VFIO:
            raise self._unsupported("VFIO passthrough")
        if isinstance(device, SharedFsDevice) and device.fs != SharedFsKind.VIRTIO_FS:
            raise self._unsupported(f"shared fs {device.fs.value}")
        return await super().add_device(device)

    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        """Boot, or with ``restore_from`` (a ``save_vm`` snapshot) restore into this fresh VMM and
        resume; within ``timeout``. A failure stops every process and removes the VM directory."""
        self._require(VmStatus.PREPARED, operation="start the VM")
        if restore_from is not None:
            self._point_snapshot_here(restore_from)
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._launch(deadline)
                for device in self.pending_devices:
                    if isinstance(device, SharedFsDevice):
                        await self._start_virtiofsd(device, deadline)
                if restore_from is not None:
                    restore = {"source_url": f"file://{restore_from}", "prefault": False}
                    await self._call("PUT", "vm.restore", restore)
                    await self._call("PUT", "vm.resume")  # a restored VM starts paused
                else:
                    await self._call("PUT", "vm.create", self._vm_config())
                    await self._call("PUT", "vm.boot")
                self.devices, self.pending_devices = self.pending_devices, []
        except TimeoutError:
            await self.cleanup()
            raise VmTimeout(
                f"{self.name}: VM {self.id} did not start within {timeout:g}s ({self._stage})"
            ) from None
        except BaseException:
            await self.cleanup()
            raise
        self.status = VmStatus.RUNNING

    def _point_snapshot_here(self, snapshot: Path) -> None:
        """The saved config names the old VM's sockets: make them this VM's.

        Each virtio-fs share in the snapshot needs a daemon again: the caller re-adds the same
        SharedFsDevice (same id) before restoring, and its new virtiofsd socket goes in here.
        """
        config_file = snapshot / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise self._error(f"{snapshot} is not a Cloud Hypervisor snapshot: {exc}") from exc
        shares = {d.id: d for d in self.pending_devices if isinstance(d, SharedFsDevice)}
        for fs in config.get("fs") or []:
            device = shares.get(fs.get("id", ""))
            if device is None:
                raise self._error(
                    f"the snapshot shares a directory as {fs.get('id')!r} (tag {fs.get('tag')!r}): "
                    "add the same shared-fs device before restoring"
                )
            fs["socket"] = str(self._fs_socket(device))
        if isinstance(config.get("vsock"), dict):
            config["vsock"]["socket"] = str(self.vsock_socket)
        config_file.write_text(json.dumps(config))

    async def _launch(self, deadline: float) -> None:
        argv = [*netns_prefix(self.netns), self.config.path, "--api-socket", f"path={self.api_socket}"]
        if self.config.disable_seccomp:
            argv += ["--seccomp", "false"]
        if self.config.enable_debug:
            argv.append("-v")
        self._vmm = VmmProcess(self.name, "cloud-hypervisor", self.vm_path / "cloud-hypervisor.log")
        await self._vmm.spawn(argv, cwd=self.vm_path)
        self._stage = f"waiting for the API socket {self.api_socket}"
        await self._vmm.wait_for_socket(self.api_socket, deadline - time.monotonic())
        self._api = ApiClient(self.name, self.api_socket, describe_error)
        await self._call("GET", "vmm.ping")

    async def _start_virtiofsd(self, device: SharedFsDevice, deadline: float) -> None:
        if not self.config.virtio_fs_daemon:
            raise self._error(f"shared fs {device.id}: virtio_fs_daemon is not configured")
        sock = self._fs_socket(device)
        check_socket_path(self.name, sock)
        argv = [
            *netns_prefix(self.netns),
            self.config.virtio_fs_daemon,
            f"--socket-path={sock}",
            f"--shared-dir={device.host_path}",
            f"--cache={self.config.virtio_fs_cache or 'never'}",
            *self.config.virtio_fs_extra_args,
        ]
        daemon = VmmProcess(self.name, "virtiofsd", self.vm_path / f"virtiofsd-{device.id}.log")
        self._virtiofsd[device.id] = daemon
        await daemon.spawn(argv, cwd=self.vm_path)
        self._stage = f"waiting for virtiofsd's socket {sock}"
        await daemon.wait_for_socket(sock, deadline - time.monotonic(), probe=False)
        device.daemon_socket = sock

    def _vm_config(self) -> dict[str, Any]:
        cfg = self.config
        vcpus = max(1, math.ceil(cfg.default_vcpus))
        payload: dict[str, Any] = {"kernel": cfg.kernel, "cmdline": self._cmdline()}
        if cfg.initrd:
            payload["initramfs"] = cfg.initrd
        if cfg.firmware:
            payload["firmware"] = cfg.firmware
        memory: dict[str, Any] = {"size": cfg.default_memory * MIB}
        # virtio-fs needs guest memory the vhost-user daemon can map, also for later hot-plug.
        if cfg.shared_fs == "virtio-fs" or any(isinstance(d, SharedFsDevice) for d in self.pending_devices):
            memory["shared"] = True
        if cfg.enable_hugepages:
            memory["hugepages"] = True
        disks = []
        if cfg.image:
            disks.append({"id": "rootfs", "path": cfg.image, "readonly": True})
        disks += [_disk(d) for d in self.pending_devices if isinstance(d, BlockDevice)]
        config: dict[str, Any] = {
            "cpus": {"boot_vcpus": vcpus, "max_vcpus": max(vcpus, cfg.default_maxvcpus)},
            "memory": memory,
            "payload": payload,
            # the serial console goes to the VMM's stdout, which lands in its capped log
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
        }
        if cfg.entropy_source:
            config["rng"] = {"src": cfg.entropy_source}
        if disks:
            config["disks"] = disks
        nets = [_net(d) for d in self.pending_devices if isinstance(d, NetworkDevice)]
        if nets:
            config["net"] = nets
        shares = [self._fs(d) for d in self.pending_devices if isinstance(d, SharedFsDevice)]
        if shares:
            config["fs"] = shares
        channels = [d for d in self.pending_devices if isinstance(d, AgentChannel)]
        if channels:
            channel = channels[0]
            config["vsock"] = {"cid": channel.guest_cid, "socket": str(channel.socket_path), "id": channel.id}
        return config

    def _cmdline(self) -> str:
        params = ["console=ttyS0"]
        if self.config.image:
            params.append("root=/dev/vda ro")
        if self.config.kernel_params:
            params.append(self.config.kernel_params)
        return " ".join(params)

    def _fs(self, device: SharedFsDevice) -> dict[str, Any]:
        return {
            "id": device.id,
            "tag": device.mount_tag,
            "socket": str(device.daemon_socket),
            "num_queues": 1,
            "queue_size": self.config.virtio_fs_queue_size or 1024,
        }

    async def stop_vm(self) -> None:
        if self.status not in (VmStatus.RUNNING, VmStatus.PAUSED):
            await self._teardown()
            self.status = VmStatus.STOPPED
            return
        if self._api is not None and self._vmm is not None and self._vmm.alive():
            # A guest that cannot power off (or an API error) must not keep the VMM alive.
            with contextlib.suppress(HypervisorError):
                await self._call("PUT", "vm.shutdown")
            with contextlib.suppress(HypervisorError):
                await self._call("PUT", "vmm.shutdown")
            await self._vmm.wait_exit(SHUTDOWN_GRACE)
        await self._teardown()
        self.status = VmStatus.STOPPED

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._call("PUT", "vm.pause")
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._call("PUT", "vm.resume")
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        """Pause the VM and snapshot it into ``<vm dir>/snapshot`` (config.json, state.json,
        memory-ranges); the VM stays paused."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="snapshot")
        if self.status == VmStatus.RUNNING:
            await self.pause_vm()
        if self.snapshot_dir.exists():
            shutil.rmtree(self.snapshot_dir)
        self.snapshot_dir.mkdir(mode=0o700)
        await self._call("PUT", "vm.snapshot", {"destination_url": f"file://{self.snapshot_dir}"})
        return self.snapshot_dir

    # -- hot-plug ---------------------------------------------------------------------------
    async def _hotplug_add(self, device: AnyDevice) -> None:
        if isinstance(device, BlockDevice):
            await self._call("PUT", "vm.add-disk", _disk(device))
        elif isinstance(device, NetworkDevice):
            await self._call("PUT", "vm.add-net", _net(device))
        elif isinstance(device, SharedFsDevice):
            await self._start_virtiofsd(device, time.monotonic() + DAEMON_START_TIMEOUT)
            try:
                await self._call("PUT", "vm.add-fs", self._fs(device))
            except BaseException:
                await self._stop_virtiofsd(device.id)
                raise
        else:
            raise self._unsupported(f"hot-plugging a {device.kind.value} device")

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        await self._call("PUT", "vm.remove-device", {"id": device.id})
        if isinstance(device, SharedFsDevice):
            await self._stop_virtiofsd(device.id)

    async def _stop_virtiofsd(self, device_id: str) -> None:
        daemon = self._virtiofsd.pop(device_id, None)
        if daemon is not None:
            await daemon.stop()
        unlink_quietly(self.vm_path / f"fs-{device_id}.sock")

    # -- queries ----------------------------------------------------------------------------
    async def get_agent_socket(self) -> str:
        return hybrid_vsock_url(self.vsock_socket, AGENT_PORT)

    async def disconnect(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def get_thread_ids(self) -> VcpuThreadIds:
        pid = self._vmm.pid if self._vmm is not None else None
        if pid is None or not self._vmm.alive():
            return VcpuThreadIds()
        return VcpuThreadIds(vcpu_thread_ids(pid, _VCPU_THREAD))

    async def get_pids(self) -> list[int]:
        procs = [self._vmm, *self._virtiofsd.values()]
        return [p.pid for p in procs if p is not None and p.pid is not None and p.alive()]

    async def info(self) -> dict[str, Any]:
        """vm.info: the VM's config, state and device tree as Cloud Hypervisor reports them."""
        return (await self._call("GET", "vm.info")).json()

    async def ping(self) -> dict[str, Any]:
        return (await self._call("GET", "vmm.ping")).json()

    # -- host side --------------------------------------------------------------------------
    async def cleanup(self) -> None:
        await self._teardown()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def _teardown(self) -> None:
        """Stop every process we run and drop the API client and sockets; keeps the VM dir."""
        await self.disconnect()
        for device_id in list(self._virtiofsd):
            await self._stop_virtiofsd(device_id)
        if self._vmm is not None:
            await self._vmm.stop()
            self._vmm = None
        if self.id:
            for path in (self.api_socket, self.vsock_socket):
                unlink_quietly(path)

    async def save_state(self) -> HypervisorState:
        vmm = self._vmm
        return await self._state(
            await self.get_agent_socket() if self.id else "",
            {
                "api_socket": str(self.api_socket) if self.id else "",
                "vmm": _proc_state(vmm),
                "virtiofsd": {dev: _proc_state(p) for dev, p in self._virtiofsd.items()},
                "netns": self.netns,
                "devices": [device_to_dict(d) for d in self.devices],
                "pending_devices": [device_to_dict(d) for d in self.pending_devices],
            },
        )

    @classmethod
    async def restore(
        cls, config: HypervisorConfig, state: HypervisorState, jailer_root: Path = DEFAULT_JAILER_ROOT
    ) -> Self:
        if state.hypervisor_name != cls.name:
            raise HypervisorError(f"{cls.name}: cannot restore state saved by {state.hypervisor_name!r}")
        self = cls(config, Path(state.jailer_root or jailer_root))
        self.id = state.id
        self.status = VmStatus(state.status)
        extra = state.extra
        self.netns = extra.get("netns")
        self.devices = [device_from_dict(d) for d in extra.get("devices", [])]
        self.pending_devices = [device_from_dict(d) for d in extra.get("pending_devices", [])]
        for device_id, proc in extra.get("virtiofsd", {}).items():
            daemon = VmmProcess(self.name, "virtiofsd")
            daemon.adopt(proc["pid"], proc["start_time"])
            self._virtiofsd[device_id] = daemon
        vmm = extra.get("vmm")
        if vmm and self.status in (VmStatus.RUNNING, VmStatus.PAUSED):
            self._vmm = VmmProcess(self.name, "cloud-hypervisor", self.vm_path / "cloud-hypervisor.log")
            self._vmm.adopt(vmm["pid"], vmm["start_time"])
            self._api = ApiClient(self.name, self.api_socket, describe_error)
            await self._call("GET", "vmm.ping")
        return self

    # -- API --------------------------------------------------------------------------------
    async def _call(self, method: str, action: str, body: Any = None) -> httpx.Response:
        if self._api is None:
            # after disconnect() the VMM still runs: reconnect on demand
            if self._vmm is None or not self._vmm.alive():
                raise self._error(f"{action}: no VMM is running (VM is {self.status.value})")
            self._api = ApiClient(self.name, self.api_socket, describe_error)
        self._stage = f"waiting for {method} {action}"
        try:
            return await self._api.request(method, f"{API}/{action}", body)
        except HypervisorError as exc:
            if self._vmm is not None and await self._vmm.died(exc):
                raise self._error(f"{action}: {self._vmm.exit_description()}") from None
            raise


def _disk(device: BlockDevice) -> dict[str, Any]:
    """The guest finds the disk by its virtio serial (the device id), cold- or hot-plugged."""
    serial = device.id[:VIRTIO_BLK_SERIAL_MAX]
    device.guest_address = f"serial:{serial}"
    disk: dict[str, Any] = {
        "id": device.id,
        "path": str(device.path),
        "readonly": device.read_only,
        "serial": serial,
    }
    if device.format == "qcow2":
        disk["image_type"] = "Qcow2"
    return disk


def _net(device: NetworkDevice) -> dict[str, Any]:
    net: dict[str, Any] = {"id": device.id, "tap": device.tap_name, "mtu": device.mtu}
    if device.mac:
        net["mac"] = device.mac
    return net


def _proc_state(proc: VmmProcess | None) -> dict[str, Any] | None:
    if proc is None or proc.pid is None:
        return None
    return {"pid": proc.pid, "start_time": proc.start_time()}
