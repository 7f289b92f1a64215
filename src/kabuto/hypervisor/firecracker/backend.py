"""Firecracker: spawn ``firecracker --api-sock`` (optionally under ``jailer``) and configure it by API.

Firecracker cannot hot-plug and has no shared filesystem: everything is cold-plugged before
InstanceStart, and the runtime hands the container rootfs over as a block device.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Self

import httpx

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, VmTimeout
from kabuto.hypervisor.base import DEFAULT_JAILER_ROOT, Hypervisor, HypervisorState, VcpuThreadIds, VmStatus
from kabuto.hypervisor.devices import (
    AgentChannel,
    AnyDevice,
    BlockDevice,
    ChannelKind,
    DeviceKind,
    NetworkDevice,
)
from kabuto.hypervisor.firecracker.plugin import CAPABILITIES
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

AGENT_PORT = 1024
GUEST_CID = 3
#: after SendCtrlAltDel, how long the guest gets to reboot (Firecracker exits on guest reboot)
SHUTDOWN_GRACE = 3.0
#: the API socket inside the jail, as Kata places it
JAILED_API_SOCKET = "/run/fc.sock"
_VCPU_THREAD = re.compile(r"fc_vcpu ?(\d+)")
# jailer --id: alphanumerics and '-', at most 64 characters
_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_RESOURCE_ID_BAD = re.compile(r"[^A-Za-z0-9_]")


def describe_error(response: httpx.Response) -> str:
    """Firecracker answers errors with ``{"fault_message": "..."}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or "(empty body)"
    if isinstance(body, dict) and "fault_message" in body:
        return str(body["fault_message"])
    return json.dumps(body)


def resource_id(device_id: str) -> str:
    """Firecracker drive and interface ids take only alphanumerics and '_'."""
    return _RESOURCE_ID_BAD.sub("_", device_id)


class Firecracker(Hypervisor):
    name = "firecracker"
    capabilities = CAPABILITIES

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT) -> None:
        super().__init__(config, jailer_root)
        self._vmm: VmmProcess | None = None
        self._api: ApiClient | None = None
        # what start_vm was doing, for a timeout's message
        self._stage = "not started"

    # -- paths: the host's view, and the VMM's (inside the jail when jailed) ------------------
    @property
    def jailed(self) -> bool:
        return bool(self.config.jailer_path)

    @property
    def jail_root(self) -> Path:
        """``<chroot base>/<exec file name>/<id>/root``, the jailer's layout, under the VM dir."""
        return self.vm_path / Path(self.config.path).name / self.id / "root"

    @property
    def api_socket(self) -> Path:
        if self.jailed:
            return self.jail_root / JAILED_API_SOCKET.lstrip("/")
        return self.vm_path / "fc.sock"

    @property
    def vsock_socket(self) -> Path:
        return (self.jail_root if self.jailed else self.vm_path) / "fc-vm.sock"

    @property
    def snapshot_dir(self) -> Path:
        return (self.jail_root if self.jailed else self.vm_path) / "snapshot"

    def _vmm_view(self, host_path: Path) -> str:
        """How Firecracker names a host path: relative to the jail's / when jailed."""
        if self.jailed:
            return "/" + str(host_path.relative_to(self.jail_root))
        return str(host_path)

    async def _expose(self, source: Path, name: str, writable: bool = False) -> str:
        """Make ``source`` visible to the VMM; in a jail, hard-link it inside.

        Where a hard link is impossible (another filesystem), a read-only file is copied; a
        writable one is refused, since the guest's writes would land in the copy.
        """
        if not self.jailed:
            return str(source)
        target = self.jail_root / name
        unlink_quietly(target)
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise self._error(f"cannot place {source} in the jail: {exc}") from exc
            if writable:
                raise self._error(
                    f"cannot hard-link the writable disk {source} into the jail {self.jail_root} "
                    f"({exc.strerror}); a copy would not receive the guest's writes: "
                    "keep the jailer root on the disk's filesystem"
                ) from exc
            await asyncio.to_thread(shutil.copy2, source, target)
        return self._vmm_view(target)

    # -- lifecycle --------------------------------------------------------------------------
    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        self._require(VmStatus.NEW, operation="prepare the VM")
        if not _ID_OK.fullmatch(id):
            raise self._error(f"invalid VM id {id!r}: use 1-64 letters, digits or '-' (the jailer's rule)")
        self.id = id
        self.netns = netns
        for path in (self.api_socket, self.vsock_socket):
            check_socket_path(self.name, path)
        self.vm_path.mkdir(parents=True, exist_ok=False, mode=0o750)
        if self.jailed:
            (self.jail_root / "run").mkdir(parents=True)
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
        # No shared fs, no VFIO: say so at once, also before boot, so the runtime picks another way.
        if device.kind in (DeviceKind.SHARED_FS, DeviceKind.VFIO):
            raise self._unsupported(f"a {device.kind.value} device")
        return await super().add_device(device)

    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        """Configure and boot, or with ``restore_from`` (a ``save_vm`` snapshot) load it into this
        fresh Firecracker and resume; within ``timeout``. A failure kills the VMM and removes the
        VM directory."""
        self._require(VmStatus.PREPARED, operation="start the VM")
        if restore_from is not None:
            for name in ("vmstate", "memory"):
                if not (restore_from / name).is_file():
                    raise self._error(f"{restore_from} is not a Firecracker snapshot (no {name})")
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._launch(deadline)
                if restore_from is not None:
                    await self._call("PUT", "/snapshot/load", await self._snapshot_load(restore_from))
                else:
                    await self._configure()
                    await self._call("PUT", "/actions", {"action_type": "InstanceStart"})
        except TimeoutError:
            await self.cleanup()
            raise VmTimeout(
                f"{self.name}: VM {self.id} did not start within {timeout:g}s ({self._stage})"
            ) from None
        except BaseException:
            await self.cleanup()
            raise
        self.devices, self.pending_devices = self.pending_devices, []
        self.status = VmStatus.RUNNING

    async def _snapshot_load(self, snapshot: Path) -> dict[str, Any]:
        if self.jailed:
            (self.jail_root / "snapshot").mkdir(exist_ok=True)
        memory = await self._expose(snapshot / "memory", "snapshot/memory")
        return {
            "snapshot_path": await self._expose(snapshot / "vmstate", "snapshot/vmstate"),
            "mem_backend": {"backend_type": "File", "backend_path": memory},
            "resume_vm": True,
            # the snapshot names the old VM's vsock socket; this VM has its own
            "vsock_override": {"uds_path": self._vmm_view(self.vsock_socket)},
        }

    async def _launch(self, deadline: float) -> None:
        fc_args = ["--api-sock", JAILED_API_SOCKET if self.jailed else str(self.api_socket)]
        if self.config.disable_seccomp:
            fc_args.append("--no-seccomp")
        if self.jailed:
            argv = [
                self.config.jailer_path,
                "--id", self.id,
                "--exec-file", self.config.path,
                "--uid", str(os.getuid()),
                "--gid", str(os.getgid()),
                "--chroot-base-dir", str(self.vm_path),
            ]  # fmt: skip
            if self.netns:
                argv += ["--netns", self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"]
            argv += ["--", *fc_args]
        else:
            argv = [*netns_prefix(self.netns), self.config.path, *fc_args]
        self._vmm = VmmProcess(
            self.name, "jailer" if self.jailed else "firecracker", self.vm_path / "firecracker.log"
        )
        await self._vmm.spawn(argv, cwd=self.vm_path)
        self._stage = f"waiting for the API socket {self.api_socket}"
        await self._vmm.wait_for_socket(self.api_socket, deadline - time.monotonic())
        self._api = ApiClient(self.name, self.api_socket, describe_error)

    async def _configure(self) -> None:
        cfg = self.config
        boot: dict[str, Any] = {
            "kernel_image_path": await self._expose(Path(cfg.kernel), "vmlinux"),
            "boot_args": self._boot_args(),
        }
        if cfg.initrd:
            boot["initrd_path"] = await self._expose(Path(cfg.initrd), "initrd")
        await self._call("PUT", "/boot-source", boot)
        machine = {
            "vcpu_count": max(1, math.ceil(cfg.default_vcpus)),
            "mem_size_mib": cfg.default_memory,
            "smt": False,
        }
        await self._call("PUT", "/machine-config", machine)
        # virtio-mmio devices show up in the guest in the order they are configured
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        if cfg.image:
            next(letters)
            path = await self._expose(Path(cfg.image), "rootfs")
            await self._put_drive(
                "rootfs", {"path_on_host": path, "is_root_device": False, "is_read_only": True}
            )
        seen: set[str] = {"rootfs"} if cfg.image else set()
        for device in self.pending_devices:
            if isinstance(device, BlockDevice):
                drive_id = self._unique(resource_id(device.id), seen, device)
                path = await self._expose(device.path, f"drive-{drive_id}", writable=not device.read_only)
                await self._put_drive(
                    drive_id,
                    {"path_on_host": path, "is_root_device": False, "is_read_only": device.read_only},
                )
                letter = next(letters, None)
                if letter is None:
                    raise self._error("more than 26 block devices")
                device.guest_address = f"/dev/vd{letter}"
            elif isinstance(device, NetworkDevice):
                iface_id = resource_id(device.id)
                iface: dict[str, Any] = {"iface_id": iface_id, "host_dev_name": device.tap_name}
                if device.mac:
                    iface["guest_mac"] = device.mac
                await self._call("PUT", f"/network-interfaces/{iface_id}", iface)
            elif isinstance(device, AgentChannel):
                vsock = {"guest_cid": device.guest_cid, "uds_path": self._vmm_view(self.vsock_socket)}
                await self._call("PUT", "/vsock", vsock)

    def _unique(self, drive_id: str, seen: set[str], device: BlockDevice) -> str:
        if drive_id in seen:
            raise self._error(
                f"block device id {device.id!r} clashes with another as Firecracker drive {drive_id!r}"
            )
        seen.add(drive_id)
        return drive_id

    async def _put_drive(self, drive_id: str, drive: dict[str, Any]) -> None:
        await self._call("PUT", f"/drives/{drive_id}", {"drive_id": drive_id, **drive})

    def _boot_args(self) -> str:
        # pci=off: Firecracker has only virtio-mmio; reboot=k + panic=1 make a guest reboot end the VMM
        params = ["console=ttyS0", "reboot=k", "panic=1", "pci=off"]
        if self.config.image:
            params.append("root=/dev/vda ro")
        if self.config.kernel_params:
            params.append(self.config.kernel_params)
        return " ".join(params)

    async def stop_vm(self) -> None:
        vmm = self._vmm
        if self.status == VmStatus.RUNNING and vmm is not None and vmm.alive() and self._api is not None:
            # No shutdown API: Ctrl-Alt-Del makes the guest reboot, and Firecracker exits on reboot.
            with contextlib.suppress(HypervisorError):
                await self._call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
                await vmm.wait_exit(SHUTDOWN_GRACE)
        await self._teardown()
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def pause_vm(self) -> None:
        self._require(VmStatus.RUNNING, operation="pause")
        await self._call("PATCH", "/vm", {"state": "Paused"})
        self.status = VmStatus.PAUSED

    async def resume_vm(self) -> None:
        self._require(VmStatus.PAUSED, operation="resume")
        await self._call("PATCH", "/vm", {"state": "Resumed"})
        self.status = VmStatus.RUNNING

    async def save_vm(self) -> Path:
        """Pause the VM and snapshot it: ``<snapshot dir>/vmstate`` and ``/memory``; returns the
        dir. The VM stays paused."""
        self._require(VmStatus.RUNNING, VmStatus.PAUSED, operation="snapshot")
        if self.status == VmStatus.RUNNING:
            await self.pause_vm()
        if self.snapshot_dir.exists():
            shutil.rmtree(self.snapshot_dir)
        self.snapshot_dir.mkdir(mode=0o700)
        body = {
            "snapshot_type": "Full",
            "snapshot_path": self._vmm_view(self.snapshot_dir / "vmstate"),
            "mem_file_path": self._vmm_view(self.snapshot_dir / "memory"),
        }
        await self._call("PUT", "/snapshot/create", body)
        return self.snapshot_dir

    # -- queries ----------------------------------------------------------------------------
    async def get_agent_socket(self) -> str:
        return hybrid_vsock_url(self.vsock_socket, AGENT_PORT)

    async def disconnect(self) -> None:
        if self._api is not None:
            await self._api.aclose()
            self._api = None

    async def get_thread_ids(self) -> VcpuThreadIds:
        vmm = self._vmm
        if vmm is None or vmm.pid is None or not vmm.alive():
            return VcpuThreadIds()
        return VcpuThreadIds(vcpu_thread_ids(vmm.pid, _VCPU_THREAD))

    async def get_pids(self) -> list[int]:
        vmm = self._vmm
        # the jailer execs Firecracker, so its pid is Firecracker's
        return [vmm.pid] if vmm is not None and vmm.pid is not None and vmm.alive() else []

    async def instance_info(self) -> dict[str, Any]:
        """GET /: the instance id, state ("Not started", "Running", "Paused") and version."""
        return (await self._call("GET", "/")).json()

    # -- host side --------------------------------------------------------------------------
    async def cleanup(self) -> None:
        await self._teardown()
        if self.id:
            shutil.rmtree(self.vm_path, ignore_errors=True)
        if self.status != VmStatus.NEW:
            self.status = VmStatus.STOPPED

    async def _teardown(self) -> None:
        await self.disconnect()
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
                "jailed": self.jailed,
                "vmm": {"pid": vmm.pid, "start_time": vmm.start_time()} if vmm and vmm.pid else None,
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
        if bool(state.extra.get("jailed")) != bool(config.jailer_path):
            raise HypervisorError(f"{cls.name}: the saved VM and this config disagree on using the jailer")
        self = cls(config, Path(state.jailer_root or jailer_root))
        self.id = state.id
        self.status = VmStatus(state.status)
        self.netns = state.extra.get("netns")
        self.devices = [device_from_dict(d) for d in state.extra.get("devices", [])]
        self.pending_devices = [device_from_dict(d) for d in state.extra.get("pending_devices", [])]
        vmm = state.extra.get("vmm")
        if vmm and self.status in (VmStatus.RUNNING, VmStatus.PAUSED):
            self._vmm = VmmProcess(self.name, "firecracker", self.vm_path / "firecracker.log")
            self._vmm.adopt(vmm["pid"], vmm["start_time"])
            self._api = ApiClient(self.name, self.api_socket, describe_error)
            await self._call("GET", "/")
        return self

    # -- API --------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        if self._api is None:
            # after disconnect() the VMM still runs: reconnect on demand
            if self._vmm is None or not self._vmm.alive():
                raise self._error(f"{method} {path}: no VMM is running (VM is {self.status.value})")
            self._api = ApiClient(self.name, self.api_socket, describe_error)
        self._stage = f"waiting for {method} {path}"
        try:
            return await self._api.request(method, path, body)
        except HypervisorError as exc:
            if self._vmm is not None and await self._vmm.died(exc):
                raise self._error(f"{method} {path}: {self._vmm.exit_description()}") from None
            raise
