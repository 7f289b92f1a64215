"""Cloud Hypervisor: spawn ``cloud-hypervisor --api-socket`` and drive its REST API (/api/v1/...)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any

import httpx

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, VmStatus
from kabuto.hypervisor.cloud_hypervisor.plugin import CAPABILITIES
from kabuto.hypervisor.cloud_hypervisor.plugin import plugin as clh_plugin
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    DeviceKind,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    serial_address,
)
from kabuto.hypervisor.plugin import HypervisorPlugin
from kabuto.hypervisor.rest_vmm import RestVmm
from kabuto.hypervisor.virtiofsd import Virtiofsds
from kabuto.hypervisor.vmm_process import VmmProcess

MIB = 1 << 20
VIRTIO_BLK_SERIAL_MAX = 20
#: how long a guest gets to power off after vm.shutdown before the VMM is stopped
SHUTDOWN_GRACE = 5.0
#: bound on a virtiofsd started for a hot-plugged share to open its socket
DAEMON_START_TIMEOUT = 10.0


def describe_error(response: httpx.Response) -> str:
    """Cloud Hypervisor answers errors with a JSON array: the error chain, root cause last."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or "(empty body)"
    if isinstance(body, list):
        return ": ".join(str(item) for item in body)
    return json.dumps(body)


class CloudHypervisor(RestVmm):
    name = "cloud-hypervisor"
    capabilities = CAPABILITIES
    default_plugin = clh_plugin
    vmm_program = "cloud-hypervisor"
    api_root = "/api/v1/"
    probe_endpoint = "vmm.ping"
    vcpu_thread = re.compile(r"vcpu(\d+)")
    vm_id_pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
    vm_id_rule = "1-64 letters, digits, '.', '_' or '-'"
    describe_api_error = staticmethod(describe_error)

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT, *,
                 plugin: HypervisorPlugin | None = None) -> None:
        super().__init__(config, jailer_root, plugin=plugin)
        self._virtiofsd = Virtiofsds(self)

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

    # -- lifecycle --------------------------------------------------------------------------
    async def add_device(self, device: AnyDevice) -> AnyDevice:
        # Refuse what this VMM can never do, also before boot, so the runtime learns early.
        if device.kind == DeviceKind.VFIO:
            raise self._unsupported("VFIO passthrough")
        if isinstance(device, SharedFsDevice) and device.fs != SharedFsKind.VIRTIO_FS:
            raise self._unsupported(f"shared fs {device.fs.value}")
        return await super().add_device(device)

    async def _boot(self, deadline: float, restore_from: Path | None) -> None:
        await self._call("GET", "vmm.ping")
        self._stage = "waiting for virtiofsd"
        await self._virtiofsd.start_all(self.pending_devices, deadline)
        if restore_from is not None:
            await self._call("PUT", "vm.restore", {"source_url": f"file://{restore_from}", "prefault": False})
            await self._call("PUT", "vm.resume")  # a restored VM starts paused
        else:
            await self._call("PUT", "vm.create", self._vm_config())
            await self._call("PUT", "vm.boot")

    def _prepare_restore(self, snapshot: Path) -> None:
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
            fs["socket"] = str(self._virtiofsd.socket(device.id))
        if isinstance(config.get("vsock"), dict):
            config["vsock"]["socket"] = str(self.vsock_socket)
        config_file.write_text(json.dumps(config))

    def _vmm_argv(self) -> list[str]:
        argv = [self.config.path, "--api-socket", f"path={self.api_socket}"]
        if self.config.disable_seccomp:
            argv += ["--seccomp", "false"]
        if self.config.enable_debug:
            argv.append("-v")
        return argv

    def _vm_config(self) -> dict[str, Any]:
        cfg = self.config
        vcpus = max(1, math.ceil(cfg.default_vcpus))
        payload: dict[str, Any] = {"kernel": cfg.kernel, "cmdline": self._kernel_cmdline()}
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
        disks += [_disk(d, cfg) for d in self.pending_devices if isinstance(d, BlockDevice)]
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

    async def _set_running(self, running: bool) -> None:
        await self._call("PUT", "vm.resume" if running else "vm.pause")

    async def _snapshot(self, directory: Path) -> None:
        """config.json, state.json and memory-ranges."""
        await self._call("PUT", "vm.snapshot", {"destination_url": f"file://{directory}"})

    # -- hot-plug ---------------------------------------------------------------------------
    async def _hotplug_add(self, device: AnyDevice) -> None:
        if isinstance(device, BlockDevice):
            await self._call("PUT", "vm.add-disk", _disk(device, self.config))
        elif isinstance(device, NetworkDevice):
            await self._call("PUT", "vm.add-net", _net(device))
        elif isinstance(device, SharedFsDevice):
            await self._virtiofsd.start(device, DAEMON_START_TIMEOUT)
            try:
                await self._call("PUT", "vm.add-fs", self._fs(device))
            except BaseException:
                await self._virtiofsd.stop(device.id)
                raise
        else:
            raise self._unsupported(f"hot-plugging a {device.kind.value} device")

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        await self._call("PUT", "vm.remove-device", {"id": device.id})
        if isinstance(device, SharedFsDevice):
            await self._virtiofsd.stop(device.id)

    # -- queries ----------------------------------------------------------------------------
    def _helper_processes(self) -> list[VmmProcess]:
        return self._virtiofsd.processes()

    async def info(self) -> dict[str, Any]:
        """vm.info: the VM's config, state and device tree as Cloud Hypervisor reports them."""
        return (await self._call("GET", "vm.info")).json()

    async def ping(self) -> dict[str, Any]:
        return (await self._call("GET", "vmm.ping")).json()

    # -- host side --------------------------------------------------------------------------
    async def _stop_helpers(self) -> None:
        await self._virtiofsd.stop_all()

    def _own_state(self) -> dict[str, Any]:
        return {"virtiofsd": self._virtiofsd.records()}

    def _adopt_helpers(self, extra: dict[str, Any]) -> list[str]:
        return self._virtiofsd.adopt(extra.get("virtiofsd", {}))


def _disk(device: BlockDevice, cfg: HypervisorConfig) -> dict[str, Any]:
    """The guest finds the disk by its virtio serial (the device id), cold- or hot-plugged. Kata's
    block num_queues and queue_size shape every disk, as Kata's Cloud Hypervisor driver does
    (0: the VMM's default)."""
    serial = device.id[:VIRTIO_BLK_SERIAL_MAX]
    device.guest_address = serial_address(serial)
    disk: dict[str, Any] = {
        "id": device.id,
        "path": str(device.path),
        "readonly": device.read_only,
        "serial": serial,
    }
    if cfg.num_queues:
        disk["num_queues"] = cfg.num_queues
    if cfg.queue_size:
        disk["queue_size"] = cfg.queue_size
    if device.format == "qcow2":
        disk["image_type"] = "Qcow2"
    return disk


def _net(device: NetworkDevice) -> dict[str, Any]:
    net: dict[str, Any] = {"id": device.id, "tap": device.tap_name, "mtu": device.mtu}
    if device.queues > 1:
        net["num_queues"] = 2 * device.queues  # NetConfig counts rx and tx queues apart
    if device.mac:
        net["mac"] = device.mac
    return net
