"""virtiofsd, the vhost-user daemon behind a virtio-fs share: one per share, spawned, waited for,
recorded, adopted and stopped with the VMM-process toolkit; used by every backend with virtio-fs.

Two daemons answer to the name: QEMU's C virtiofsd (QEMU 7.2 and older, Debian's
/usr/lib/qemu/virtiofsd: ``-o source=DIR``, cache ``none``) and the Rust one (Kata's
/usr/libexec/virtiofsd: ``--shared-dir DIR``, cache ``never``). Which one a path is comes from
its own ``--help``.

Confinement: the daemon chroots into the shared directory (``sandbox=chroot``) and keeps its
seccomp filter. Its namespace sandbox would pivot into a mount namespace of its own, where a
container's rootfs and bind mounts made after boot arrive only by propagation and a read-only
bind's remount would not arrive at all: the guest could write through a read-only bind. In the
host's mount namespace the daemon sees each mount as the host made it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable
from kabuto.hypervisor.devices import AnyDevice, SharedFsDevice, SharedFsKind
from kabuto.hypervisor.vmm_process import VmmProcess, check_socket_path, unlink_quietly

if TYPE_CHECKING:
    from kabuto.hypervisor.base import Hypervisor

#: bound on ``virtiofsd --help`` (to tell the two daemons apart)
PROBE_TIMEOUT = 10.0
#: Kata's cache names -> the C daemon's
_C_CACHE = {"never": "none", "auto": "auto", "always": "always"}


@functools.cache
def _flavour(daemon: str, mtime: float) -> str:
    """"rust" or "c", from the daemon's own usage text (cached per binary version)."""
    try:
        result = subprocess.run([daemon, "--help"], capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HypervisorUnavailable(f"virtiofsd {daemon} cannot be run: {exc}") from None
    usage = (result.stdout + result.stderr).decode(errors="replace")
    return "rust" if "--shared-dir" in usage else "c"


def virtiofsd_argv(config: HypervisorConfig, socket: Path, shared_dir: Path) -> list[str]:
    """The daemon's command line for one share, in the dialect of the configured binary."""
    daemon = config.virtio_fs_daemon
    if not daemon:
        raise HypervisorError("shared_fs = virtio-fs needs virtio_fs_daemon (the virtiofsd binary)")
    try:
        mtime = os.stat(daemon).st_mtime
    except OSError as exc:
        raise HypervisorUnavailable(f"virtiofsd binary {daemon} not found ({exc.strerror})") from None
    cache = config.virtio_fs_cache or "never"
    if _flavour(daemon, mtime) == "rust":
        argv = [daemon, f"--socket-path={socket}", f"--shared-dir={shared_dir}", f"--cache={cache}",
                "--sandbox=chroot", "--announce-submounts"]
    else:
        argv = [daemon, f"--socket-path={socket}", "-o", f"source={shared_dir}",
                "-o", f"cache={_C_CACHE.get(cache, cache)}", "-o", "sandbox=chroot",
                "-o", "announce_submounts"]
    return [*argv, *config.virtio_fs_extra_args]


class Virtiofsds:
    """The virtiofsd of each virtio-fs share of one VM (``owner``), by device id."""

    def __init__(self, owner: Hypervisor) -> None:
        self.owner = owner
        self._daemons: dict[str, VmmProcess] = {}

    def socket(self, device_id: str) -> Path:
        return self.owner.vm_path / f"fs-{device_id}.sock"

    def _process(self, device_id: str) -> VmmProcess:
        return VmmProcess(self.owner.name, "virtiofsd", self.owner.vm_path / f"virtiofsd-{device_id}.log")

    async def start(self, device: SharedFsDevice, timeout: float) -> None:
        """Spawn the share's daemon (in the VM's netns) and wait, bounded, until its socket
        exists; the device then names the socket. The daemon serves one frontend, so the socket
        is not probed."""
        socket = self.socket(device.id)
        check_socket_path(self.owner.name, socket)
        if not device.host_path.is_dir():
            raise HypervisorError(f"{self.owner.name}: shared directory {device.host_path} does not exist")
        argv = await asyncio.to_thread(virtiofsd_argv, self.owner.config, socket, device.host_path)
        daemon = self._process(device.id)
        self._daemons[device.id] = daemon
        await daemon.spawn(argv, cwd=self.owner.vm_path, netns=self.owner.netns)
        await daemon.wait_for_socket(socket, timeout, probe=False)
        device.daemon_socket = socket

    async def start_all(self, devices: list[AnyDevice], deadline: float) -> None:
        """A daemon for every virtio-fs share among ``devices`` (the pending ones, before boot)."""
        for device in devices:
            if isinstance(device, SharedFsDevice) and device.fs == SharedFsKind.VIRTIO_FS:
                await self.start(device, deadline - time.monotonic())

    async def stop(self, device_id: str) -> None:
        daemon = self._daemons.pop(device_id, None)
        if daemon is not None:
            await daemon.stop()
        if self.owner.id:
            unlink_quietly(self.socket(device_id))

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(device_id) for device_id in list(self._daemons)))

    async def first_exit(self) -> str:
        """Wait (the caller bounds it: a task cancelled at stop) until one of the daemons exits;
        what happened, for an error. Never returns while there is none."""
        waits = {asyncio.ensure_future(daemon.wait_exit(None)): device_id
                 for device_id, daemon in self._daemons.items()}
        if not waits:
            await asyncio.Event().wait()
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return await self._exit_of(waits[next(iter(done))])

    async def exited(self) -> list[str]:
        """What happened to each daemon that is no longer running, for an error."""
        return [await self._exit_of(device_id) for device_id, daemon in self._daemons.items()
                if daemon.pid is not None and not daemon.alive()]

    async def _exit_of(self, device_id: str) -> str:
        daemon = self._daemons[device_id]
        await daemon.output_done()
        return f"the virtiofsd of share {device_id!r} {daemon.exit_description().removeprefix('virtiofsd ')}"

    def processes(self) -> list[VmmProcess]:
        return list(self._daemons.values())

    def records(self) -> dict[str, Any]:
        return {device_id: daemon.record() for device_id, daemon in self._daemons.items()}

    def adopt(self, records: dict[str, Any]) -> list[str]:
        """Take over the daemons another kabuto process recorded (``records``); what is gone of
        them, said for an error. A VM whose daemon is gone lost that share: its guest's reads and
        writes there never complete, so the backend stops the VM (``stop_all`` reaps the rest)."""
        gone = []
        for device_id, record in records.items():
            daemon = self._process(device_id)
            try:
                daemon.adopt(record or {})
            except (HypervisorError, KeyError, ValueError, TypeError) as exc:
                gone.append(f"the virtiofsd of share {device_id!r} is gone ({exc})")
                unlink_quietly(self.socket(device_id))
                continue
            self._daemons[device_id] = daemon
        return gone
