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
from pathlib import Path
from typing import Any

import httpx

from kabuto.errors import HypervisorError
from kabuto.hypervisor.base import VmStatus, vm_dir_name
from kabuto.hypervisor.devices import AgentChannel, AnyDevice, BlockDevice, DeviceKind, NetworkDevice
from kabuto.hypervisor.firecracker.plugin import CAPABILITIES
from kabuto.hypervisor.firecracker.plugin import plugin as firecracker_plugin
from kabuto.hypervisor.rest_vmm import RestVmm
from kabuto.hypervisor.vmm_process import netns_path, unlink_quietly

#: after SendCtrlAltDel, how long the guest gets to reboot (Firecracker exits on guest reboot)
SHUTDOWN_GRACE = 3.0
#: the API socket inside the jail, as Kata places it
JAILED_API_SOCKET = "/run/fc.sock"
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


class Firecracker(RestVmm):
    name = "firecracker"
    capabilities = CAPABILITIES
    default_plugin = firecracker_plugin
    vmm_program = "firecracker"
    probe_endpoint = "/"
    vcpu_thread = re.compile(r"fc_vcpu ?(\d+)")
    # jailer --id: alphanumerics and '-', at most 64 characters
    vm_id_pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
    vm_id_rule = "1-64 letters, digits or '-' (the jailer's rule)"
    describe_api_error = staticmethod(describe_error)

    # -- paths: the host's view, and the VMM's (inside the jail when jailed) ------------------
    @property
    def jailed(self) -> bool:
        return bool(self.config.jailer_path)

    @property
    def _spawned_program(self) -> str:
        # the jailer execs Firecracker, so the process (and its pid) becomes Firecracker's
        return "jailer" if self.jailed else self.vmm_program

    @property
    def _spawn_netns(self) -> str | None:
        # the jailer joins the netns itself (--netns) before it execs Firecracker
        return None if self.jailed else self.netns

    @property
    def jail_root(self) -> Path:
        """``<chroot base>/<exec file name>/<id>/root``, the jailer's layout, under the VM dir (the
        jailer's id is the VM directory's short name, so its socket fits sun_path too)."""
        return self.vm_path / Path(self.config.path).name / vm_dir_name(self.id) / "root"

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
    def _make_vm_dir(self) -> None:
        super()._make_vm_dir()
        if self.jailed:
            (self.jail_root / "run").mkdir(parents=True)

    async def add_device(self, device: AnyDevice) -> AnyDevice:
        # No shared fs, no VFIO: say so at once, also before boot, so the runtime picks another way.
        if device.kind in (DeviceKind.SHARED_FS, DeviceKind.VFIO):
            raise self._unsupported(f"a {device.kind.value} device")
        return await super().add_device(device)

    def _prepare_restore(self, snapshot: Path) -> None:
        for name in ("vmstate", "memory"):
            if not (snapshot / name).is_file():
                raise self._error(f"{snapshot} is not a Firecracker snapshot (no {name})")

    async def _boot(self, deadline: float, restore_from: Path | None) -> None:
        if restore_from is not None:
            await self._call("PUT", "/snapshot/load", await self._snapshot_load(restore_from))
        else:
            await self._configure()
            await self._call("PUT", "/actions", {"action_type": "InstanceStart"})

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

    def _vmm_argv(self) -> list[str]:
        fc_args = ["--api-sock", JAILED_API_SOCKET if self.jailed else str(self.api_socket)]
        if self.config.disable_seccomp:
            fc_args.append("--no-seccomp")
        if not self.jailed:
            return [self.config.path, *fc_args]
        argv = [
            self.config.jailer_path,
            "--id", vm_dir_name(self.id),
            "--exec-file", self.config.path,
            "--uid", str(os.getuid()),
            "--gid", str(os.getgid()),
            "--chroot-base-dir", str(self.vm_path),
        ]  # fmt: skip
        if self.netns:
            argv += ["--netns", netns_path(self.netns)]
        return [*argv, "--", *fc_args]

    async def _configure(self) -> None:
        cfg = self.config
        boot: dict[str, Any] = {
            "kernel_image_path": await self._expose(Path(cfg.kernel), "vmlinux"),
            # pci=off: Firecracker has only virtio-mmio; reboot=k makes a guest reboot end the VMM
            "boot_args": self._kernel_cmdline("reboot=k", "pci=off"),
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

    async def _set_running(self, running: bool) -> None:
        await self._call("PATCH", "/vm", {"state": "Resumed" if running else "Paused"})

    async def _snapshot(self, directory: Path) -> None:
        body = {
            "snapshot_type": "Full",
            "snapshot_path": self._vmm_view(directory / "vmstate"),
            "mem_file_path": self._vmm_view(directory / "memory"),
        }
        await self._call("PUT", "/snapshot/create", body)

    # -- queries ----------------------------------------------------------------------------
    async def instance_info(self) -> dict[str, Any]:
        """GET /: the instance id, state ("Not started", "Running", "Paused") and version."""
        return (await self._call("GET", "/")).json()

    # -- host side --------------------------------------------------------------------------
