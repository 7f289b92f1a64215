"""PCI hot-plug through QMP: virtio-blk (or virtio-scsi) disks, virtio-net NICs and virtio-9p
shares whose -fsdev backend is on the command line (a template's clone), each on a free hot-plug
slot (a PCIe root port on q35, the root bus on pc), undone on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os

from qemu.qmp import EventListener

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, UnsupportedOperation, VmTimeout
from kabuto.hypervisor.devices import (
    AnyDevice,
    BlockDevice,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    serial_address,
)
from kabuto.hypervisor.qemu.cmdline import (
    block_device_args,
    block_iothread,
    block_serial,
    blockdev_args,
    hotplug_bus,
    net_device_args,
    netdev_args,
    root_port_count,
    virtio_9p_device_args,
)
from kabuto.hypervisor.qemu.qmp import QmpSession
from kabuto.hypervisor.tapfd import open_tap

DEVICE_RELEASE_TIMEOUT = 10.0


class Hotplug:
    """What a running VM's hot-plugged PCI devices occupy: device id -> bus."""

    def __init__(self, qmp: QmpSession, config: HypervisorConfig, slots: dict[str, str],
                 vhost_net: bool) -> None:
        self.qmp = qmp
        self.config = config
        self.slots = slots
        self.vhost_net = vhost_net

    async def add(self, device: AnyDevice) -> None:
        if isinstance(device, BlockDevice):
            await self._add_block(device)
        elif isinstance(device, NetworkDevice):
            await self._add_net(device)
        elif isinstance(device, SharedFsDevice) and device.fs == SharedFsKind.VIRTIO_9P:
            await self._add_9p(device)
        else:
            raise UnsupportedOperation(f"qemu: hot-plugging a {device.kind.value} device is not supported "
                                       "by this VMM")

    async def _add_block(self, device: BlockDevice) -> None:
        driver = self.config.block_device_driver or "virtio-blk"
        bus = self._take_slot(device.id) if driver == "virtio-blk" else None
        try:
            await self.qmp.call("blockdev-add", blockdev_args(device, self.config))
            try:
                await self.qmp.call("device_add", block_device_args(device, driver, bus,
                                                                    block_iothread(self.config)))
            except BaseException:
                await self.qmp.call("blockdev-del", {"node-name": f"drive-{device.id}"})
                raise
        except BaseException:
            self.slots.pop(device.id, None)
            raise
        device.guest_address = serial_address(block_serial(device))

    async def _add_net(self, device: NetworkDevice) -> None:
        bus = self._take_slot(device.id)
        try:
            fd_names = await self._pass_tap(device) if device.netns else None
            try:
                await self.qmp.call("netdev_add", netdev_args(device, self.vhost_net, fd_names))
            except BaseException:
                for name in fd_names or []:
                    with contextlib.suppress(HypervisorError):
                        await self.qmp.call("closefd", {"fdname": name})
                raise
            try:
                await self.qmp.call("device_add", net_device_args(device, bus))
            except BaseException:
                await self.qmp.call("netdev_del", {"id": f"net-{device.id}"})
                raise
        except BaseException:
            self.slots.pop(device.id, None)
            raise

    async def _pass_tap(self, device: NetworkDevice) -> list[str]:
        """The device's tap lives in ``device.netns``, not QEMU's: opened there, its descriptors
        (one per queue) are handed to QEMU by name; ours are closed (QEMU holds its copies)."""
        fds = await open_tap(device.netns, device.tap_name, device.queues)
        names = [f"tap-{device.id}-{index}" for index in range(len(fds))]
        passed: list[str] = []
        try:
            for fd, name in zip(fds, names, strict=True):
                await self.qmp.pass_fd(fd, name)
                passed.append(name)
        except BaseException:
            for name in passed:
                with contextlib.suppress(HypervisorError):
                    await self.qmp.call("closefd", {"fdname": name})
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return names

    async def _add_9p(self, device: SharedFsDevice) -> None:
        """The device of a 9p share whose backend the command line already has (``fsdev_cmdline``)."""
        bus = self._take_slot(device.id)
        try:
            await self.qmp.call("device_add", virtio_9p_device_args(device, bus))
        except BaseException:
            self.slots.pop(device.id, None)
            raise

    async def remove(self, device: AnyDevice) -> None:
        if not isinstance(device, BlockDevice | NetworkDevice):
            raise UnsupportedOperation(f"qemu: hot-unplugging a {device.kind.value} device is not supported "
                                       "by this VMM")
        listener = EventListener("DEVICE_DELETED", lambda e: e["data"].get("device") == device.id)
        with self.qmp.listen(listener):
            await self.qmp.call("device_del", {"id": device.id})
            try:
                async with asyncio.timeout(DEVICE_RELEASE_TIMEOUT):
                    await listener.get()
            except TimeoutError:
                raise VmTimeout(f"qemu: the guest did not release device {device.id} within "
                                f"{DEVICE_RELEASE_TIMEOUT:g}s") from None
        if isinstance(device, BlockDevice):
            await self.qmp.call("blockdev-del", {"node-name": f"drive-{device.id}"})
        else:
            await self.qmp.call("netdev_del", {"id": f"net-{device.id}"})
        self.slots.pop(device.id, None)

    def _take_slot(self, device_id: str) -> str | None:
        if self.config.machine_type != "q35":
            return hotplug_bus(self.config.machine_type, 0)
        used = set(self.slots.values())
        for index in range(root_port_count(self.config)):
            bus = hotplug_bus("q35", index)
            if bus not in used:
                self.slots[device_id] = bus
                return bus
        raise HypervisorError(f"qemu: no free hot-plug slot for {device_id}: all "
                              f"{root_port_count(self.config)} PCIe root ports are in use "
                              "(raise pcie_root_port)")
