"""The VirtContainer handler: one VM (a sandbox) holding one or more containers.

Start procedure (after Kata runtime-rs): resolve_config -> new_hypervisor -> prepare_vm -> shared
fs (or rootfs block devices) added -> start_vm -> agent reached -> CreateSandbox -> containers.
Every step that fails undoes the ones before it: the VM is stopped, mounts and images are
removed and the state directory is gone.

The record keeps what the sandbox was made with: the effective configuration (after
annotations and the plugin's adjust; the hypervisor table inside the hypervisor's saved state)
and the capabilities the runtime chose its strategies by. ``attach`` rebuilds from that, never
from the configuration file as it reads now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kabuto.agent.client import AgentClient, wait_for_agent
from kabuto.agent.containers import ContainerCallError, ContainerClient
from kabuto.agent.containers import Storage as AgentStorage
from kabuto.config.model import KabutoConfig
from kabuto.errors import AgentError, HypervisorError, KabutoError
from kabuto.hypervisor import new_hypervisor, resolve_config, restore_hypervisor
from kabuto.hypervisor.base import Hypervisor, HypervisorState, VmStatus, vm_dir_name
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import BlockDevice, DeviceKind, NetworkDevice, SharedFsDevice
from kabuto.hypervisor.vmm_process import kill_processes_naming
from kabuto.processes import process_record
from kabuto.runtime import factory, host_cgroup, network
from kabuto.runtime import resources as resource_sizing
from kabuto.runtime import rootfs as rootfs_delivery
from kabuto.runtime.bundle import Bundle, BundleError, ContainerIdError, check_container_id
from kabuto.runtime.factory import cache_store
from kabuto.runtime.freshen import freshen_guest
from kabuto.runtime.rootfs import RootfsError, Storage
from kabuto.runtime.state import ContainerRecord, SandboxRecord, StateError, StateStore, now_rfc3339
from kabuto.ttrpc.status import Code

log = logging.getLogger(__name__)

DEFAULT_BOOT_TIMEOUT = 120.0
SHARED_FS_DEVICE_ID = "kabuto-shared"
INIT_EXEC_ID = ""
# `state`/`list` ask whether the init process has exited; this long a "no" means running.
STATUS_POLL = 0.5
READ_CHUNK = 1024 * 1024
# a VMM's agent connection closes a moment before its exit can be seen (reaped, or a zombie)
VMM_EXIT_GRACE = 2.0
# how long the guest gets to bring hot-added vCPUs online
CPU_ONLINE_WAIT = 20.0


class SandboxError(KabutoError):
    """A sandbox or container operation failed; the message says which and why."""


def _agent_storage(storage: Storage) -> AgentStorage:
    return AgentStorage(source=storage.source, mount_point=storage.mount_point, fstype=storage.fstype,
                        options=list(storage.options))


def refuse_binds_without_shared_fs(bundle: Bundle, has_shared_fs: bool, backend: str) -> None:
    """A host path reaches the guest only through a shared filesystem: refuse before anything is made."""
    binds = bundle.host_binds()
    if binds and not has_shared_fs:
        bind = binds[0]
        raise SandboxError(f"mounts[{bind.index}] ({bind.destination}, source {bind.source}): "
                           f"bind mounts need a shared filesystem; {backend} has none")


def container_client(agent: AgentClient) -> ContainerClient:
    """The ContainerService client on an agent connection (a seam the unit tests replace)."""
    return ContainerClient(agent)


class VirtSandbox:
    """A running (or restored) sandbox VM. Build with ``create`` or ``attach``; end with ``destroy``."""

    def __init__(self, record: SandboxRecord, store: StateStore, hypervisor: Hypervisor,
                 config: KabutoConfig, capabilities: Capabilities) -> None:
        self.record = record
        self.store = store
        self.hypervisor = hypervisor
        #: the effective [runtime] and [agent] tables this sandbox was made with
        self.config = config
        #: what the runtime chooses its strategies by (rootfs delivery, hot-plug)
        self.capabilities = capabilities
        self.agent: AgentClient | None = None
        self._containers: Any = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def directory(self) -> Path:
        return self.store.sandbox_dir(self.id)

    # -- creation ----------------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        sandbox_id: str,
        store: StateStore,
        *,
        config_path: str | None = None,
        hypervisor_name: str | None = None,
        annotations: dict[str, str] | None = None,
        hostname: str = "",
        netns: str | None = None,
        block_rootfs: list[tuple[str, Bundle]] | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        cgroups_path: str | None = None,
    ) -> VirtSandbox:
        """Boot a sandbox VM and reach its agent. ``block_rootfs`` lists the containers whose rootfs
        must be cold-plugged when the backend has no shared filesystem. ``cgroups_path``: the
        sandbox container's host cgroup, which the VMM runs in under sandbox_cgroup_only.

        The caller reserved ``sandbox_id`` in ``store`` (``StateStore.reserve``); on failure the
        reservation is released too.
        """
        check_container_id(sandbox_id)
        boot_deadline = time.monotonic() + boot_timeout
        record = store.load(sandbox_id)
        hypervisor: Hypervisor | None = None
        sandbox: VirtSandbox | None = None
        try:
            resolved = resolve_config(config_path, annotations, hypervisor_name)
            # once per sandbox: a later process attaches from the record and loads nothing
            for warning in resolved.config.warnings:
                log.warning("%s: %s", resolved.config.source, warning)
            hypervisor = new_hypervisor(resolved, jailer_root=store.jailer_root)
            capabilities = hypervisor.capabilities
            record.hypervisor_name = resolved.name
            record.config = resolved.config.model_dump(mode="json", include={"runtime", "agent"})
            record.capabilities = capabilities.to_dict()
            sandbox = cls(record, store, hypervisor, resolved.config, capabilities)
            fs_kind = capabilities.preferred_shared_fs()
            for _, bundle in block_rootfs or []:
                refuse_binds_without_shared_fs(bundle, fs_kind is not None, hypervisor.name)
            await hypervisor.check()
            if netns is not None:
                _check_netns(netns)
            record.netns = netns or ""
            if cgroups_path and resolved.config.runtime.sandbox_cgroup_only:
                # before anything is spawned: the VMM and virtiofsd inherit it
                record.host_cgroup = host_cgroup.join(cgroups_path, os.getpid())
                store.save(record)
            storages: list[Storage] = []
            shares: list[SharedFsDevice] = []
            if fs_kind is not None:
                shared = sandbox.directory / "shared"
                shared.mkdir(mode=0o700)
                record.shared_dir, record.share_tag = str(shared), rootfs_delivery.SHARE_TAG
                shares.append(SharedFsDevice(SHARED_FS_DEVICE_ID, fs_kind, shared, rootfs_delivery.SHARE_TAG))
                storages.append(rootfs_delivery.sandbox_share_storage(fs_kind.value,
                                                                      hypervisor.config.msize_9p))
            store.save(record)
            warm, record.warm_start = await _take_warm(
                factory.WarmRequest(sandbox_id, resolved, store.jailer_root, netns, shares, boot_timeout,
                                    claim=sandbox._claim_vm),
                block_rootfs)
            if warm is not None:
                # a running VM with the shares on it: NICs are hot-plugged
                hypervisor = sandbox.hypervisor = warm
                sandbox._share_through(warm)
                endpoints = await sandbox._plug_endpoints() if netns else []
            else:
                if record.hypervisor_state:  # claimed, then found dead: the source removed it
                    record.hypervisor_state = {}
                    store.save(record)
                await hypervisor.prepare_vm(sandbox_id, netns=netns)
                for share in shares:
                    await hypervisor.add_device(share)
                if fs_kind is None:
                    for container_id, bundle in block_rootfs or []:
                        await hypervisor.add_device(await sandbox._block_device(container_id, bundle))
                endpoints = await sandbox._plug_endpoints() if netns else []
                store.save(record)
                await hypervisor.start_vm(timeout=boot_timeout)
            await sandbox._persist_hypervisor()
            await sandbox.connect(boot_timeout)
            if warm is not None:
                # a clone's RNG and clock are its template's: fresh ones before any container
                assert sandbox.agent is not None
                await sandbox._agent_call("freshen", freshen_guest(sandbox.agent))
            # the guest's container service may still be loading (a slow import on a busy host):
            # the first call may take what is left of the boot's budget, not just one call's
            first_call = max(boot_deadline - time.monotonic(),
                             resolved.config.active_agent.request_timeout_ms / 1000)
            await sandbox._agent_call("CreateSandbox", sandbox.containers.create_sandbox(
                hostname=hostname, storages=[_agent_storage(s) for s in storages], sandbox_id=sandbox_id,
                timeout=first_call))
            await sandbox._configure_guest_network(endpoints)
            record.status = "ready"
            store.save(record)
            return sandbox
        except BaseException:
            if sandbox is not None:
                await sandbox._teardown()
            else:
                if hypervisor is not None:
                    await hypervisor.cleanup()
                store.remove(sandbox_id)
            raise

    def _claim_vm(self, state: HypervisorState) -> None:
        """A warm source hands over a VM another process runs: recorded before it lets go."""
        self.record.hypervisor_state = state.to_dict()
        self.store.save(self.record)

    def _share_through(self, warm: Hypervisor) -> None:
        """A warm VM that came with a share of its own (a cached VM's, exporting a directory the
        cache made): the sandbox shares its rootfs and binds through that directory."""
        share = next((d for d in warm.devices
                      if isinstance(d, SharedFsDevice) and d.id == SHARED_FS_DEVICE_ID), None)
        if share is None or str(share.host_path) == self.record.shared_dir:
            return
        if self.record.shared_dir:
            with contextlib.suppress(OSError):
                Path(self.record.shared_dir).rmdir()  # made for a share that never came
        self.record.shared_dir, self.record.share_tag = str(share.host_path), share.mount_tag
        self.store.save(self.record)

    @classmethod
    async def attach(cls, sandbox_id: str, store: StateStore) -> VirtSandbox:
        """Rebuild the sandbox another process created, from its persisted state (no agent yet)."""
        record = store.load(sandbox_id)
        if not record.hypervisor_state:
            raise SandboxError(f"sandbox {sandbox_id!r} is still being created (or its creator died)")
        try:
            config = KabutoConfig.model_validate(record.config)
            capabilities = Capabilities.from_dict(record.capabilities)
            state = HypervisorState.from_dict(record.hypervisor_state)
        except (ValueError, TypeError, KeyError) as exc:
            raise SandboxError(f"sandbox {sandbox_id!r}: its record {store.record_path(sandbox_id)} is "
                               f"damaged: {exc}") from None
        hypervisor = await restore_hypervisor(state, jailer_root=store.jailer_root)
        return cls(record, store, hypervisor, config, capabilities)

    @property
    def vm_alive(self) -> bool:
        return self.hypervisor.status in (VmStatus.RUNNING, VmStatus.PAUSED)

    async def connect(self, timeout: float | None = None) -> None:
        """Reach the agent within ``timeout`` seconds (the boot's), by default [agent]
        reconnect_timeout_ms: the agent of a running VM answers at once. Its calls are bounded
        by request_timeout_ms, CreateContainer by [runtime] create_container_timeout."""
        if self.agent is not None:
            return
        if not self.vm_alive:
            raise SandboxError(f"sandbox {self.id!r}: its VM is not running")
        agent = self.config.active_agent
        # claims an agent port of its own: other processes reach the agent through the others
        self.agent = await wait_for_agent(
            await self.hypervisor.get_agent_sockets(),
            agent.reconnect_timeout_ms / 1000 if timeout is None else timeout,
            call_timeout=agent.request_timeout_ms / 1000, retry_interval=agent.dial_timeout_ms / 1000)
        self._containers = container_client(self.agent)

    async def disconnect(self) -> None:
        """Leave the VM running for a later process; drop the agent and control connections."""
        await self._close_agent()
        await self._persist_hypervisor()
        await self.hypervisor.disconnect()

    async def save(self) -> None:
        """Persist the record with the hypervisor's current state."""
        await self._persist_hypervisor()

    async def release_vmm_control(self) -> None:
        """Keep the agent connection but drop the VMM's control connection (QEMU's QMP takes
        one client at a time), so other processes can attach while this one streams."""
        await self.hypervisor.disconnect()

    async def close(self) -> None:
        """Drop the agent and control connections without saving anything: for a process that
        left the record to others while it streamed."""
        await self._close_agent()
        await self.hypervisor.disconnect()

    async def _close_agent(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(KabutoError, OSError):
                await self.agent.close()
        self.agent = None
        self._containers = None

    async def _persist_hypervisor(self) -> None:
        self.record.hypervisor_state = (await self.hypervisor.save_state()).to_dict()
        self.store.save(self.record)

    @property
    def containers(self) -> Any:
        if self._containers is None:
            raise SandboxError(f"sandbox {self.id!r}: not connected to its agent")
        return self._containers

    async def _agent_call(self, what: str, call: Any) -> Any:
        """Await an agent call; if the VM died meanwhile, say so (and how) instead of a socket error."""
        try:
            return await call
        except KabutoError as exc:
            if not await self._vm_exited():
                raise
            reason = self.hypervisor.exit_reason()
            raise SandboxError(f"sandbox {self.id!r}: its VM exited{f' ({reason})' if reason else ''}; "
                               f"{what} failed") from exc

    async def _vm_exited(self) -> bool:
        """After a failed agent call: whether the VMM is gone. A lost agent connection is the
        first sign of a dying VMM (its sockets close before its exit is seen): it gets a
        moment to be seen gone."""
        if not await self.vmm_running():
            return True
        if self.agent is not None and not self.agent.closed:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VMM_EXIT_GRACE
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            if not await self.vmm_running():
                return True
        return False

    async def vmm_running(self) -> bool:
        """Whether the VMM process is still there (its pids, not the recorded status)."""
        return bool(await self.hypervisor.get_pids())

    # -- containers --------------------------------------------------------------------------
    async def _block_device(self, container_id: str, bundle: Bundle) -> BlockDevice:
        image = self.directory / f"{container_id}.ext4"
        await rootfs_delivery.build_ext4_image(bundle.rootfs, image)
        return BlockDevice(f"rootfs-{container_id}", image, read_only=bundle.readonly_root)

    async def _deliver_rootfs(
        self, container_id: str, bundle: Bundle
    ) -> tuple[str, Storage | None, dict[str, Any]]:
        """(guest root path, storage the agent mounts there or None, how to undo it)."""
        if self.record.shared_dir:
            guest_root = await rootfs_delivery.share_rootfs(Path(self.record.shared_dir), container_id,
                                                            bundle.rootfs)
            return guest_root, None, {"kind": "shared"}
        device_id = f"rootfs-{container_id}"
        device = next((d for d in self.hypervisor.devices if d.id == device_id), None)
        if device is None:
            if not self.capabilities.can_hotplug(DeviceKind.BLOCK):
                raise SandboxError(
                    f"{self.hypervisor.name} has neither a shared filesystem nor block hot-plug: "
                    f"container {container_id!r} cannot join a running sandbox")
            device = await self.hypervisor.add_device(await self._block_device(container_id, bundle))
            await self._persist_hypervisor()
        assert isinstance(device, BlockDevice)
        storage = rootfs_delivery.block_storage(device.guest_address, container_id, bundle.readonly_root)
        return storage.mount_point, storage, {"kind": "block", "device_id": device_id,
                                              "image": str(device.path)}

    async def create_container(self, container_id: str, bundle: Bundle, *,
                               host_cgroup_by_caller: bool = False) -> ContainerRecord:
        """Create (not start) a container from ``bundle``; recorded before the agent hears of it.
        Its host bind mounts are shared beside its rootfs and the guest spec points at them.
        ``host_cgroup_by_caller``: the caller places its host side at cgroupsPath (``kabuto create``)."""
        check_container_id(container_id)
        refuse_binds_without_shared_fs(bundle, bool(self.record.shared_dir), self.hypervisor.name)
        # [runtime] disable_guest_seccomp: a spec's seccomp profile is dropped (Kata's default);
        # otherwise refused, as the guest cannot enforce one
        if bundle.spec.get("linux", {}).get("seccomp") and not self.config.runtime.disable_guest_seccomp:
            raise BundleError(f"{bundle.path / 'config.json'}: linux.seccomp: the guest cannot enforce a "
                              "seccomp profile; [runtime] disable_guest_seccomp = true runs the container "
                              "without it, as Kata does")
        joined = await self._joined_namespaces(container_id, bundle)
        if container_id != self.id and self.record.netns:
            await self._rescan_endpoints()
        cgroups_path = bundle.spec.get("linux", {}).get("cgroupsPath")
        if cgroups_path and not self.config.runtime.sandbox_cgroup_only and not host_cgroup_by_caller:
            # the container's limits apply in the guest's cgroup; on the host nothing moves there
            log.warning("container %s: linux.cgroupsPath %s is not applied on the host (the VMM and the "
                        "shim stay where they run): [runtime] sandbox_cgroup_only = true puts them in the "
                        "sandbox's", container_id, cgroups_path)
        container = ContainerRecord(id=container_id, bundle=str(bundle.path), created=now_rfc3339(),
                                    annotations=bundle.annotations, process=bundle.spec["process"],
                                    resources=dict(bundle.spec.get("linux", {}).get("resources") or {}))
        # refuses an id in use anywhere under the state root, before anything is made for it
        self.record = self.store.add_container(self.id, container)
        try:
            guest_root, storage, container.rootfs = await self._deliver_rootfs(container_id, bundle)
            container.rootfs["source"] = str(bundle.rootfs)  # the host path `state` reports
            self.record.containers[container_id] = container
            self.store.save(self.record)
            binds = bundle.host_binds()
            bind_sources: dict[int, str] = {}
            if binds:
                bind_sources = await rootfs_delivery.share_binds(Path(self.record.shared_dir), container_id,
                                                                 binds)
            spec = bundle.guest_spec(guest_root, bind_sources, joined)
            await self._fit_resources(container_id, container.resources)
            await self._agent_call("CreateContainer", self.containers.create_container(
                container_id, json.dumps(spec).encode(), rootfs=_agent_storage(storage) if storage else None,
                timeout=self.config.runtime.create_container_timeout))
        except BaseException:
            await self._release_rootfs(container)
            self.record.containers.pop(container_id, None)
            self.store.save(self.record)
            raise
        return container

    # -- pod networking (Kata's tcfilter model) ----------------------------------------------
    async def _plug_endpoints(self) -> list[network.Endpoint]:
        """A tap joined by tc redirects to each interface CNI left in the sandbox's netns, and a
        virtio-net NIC with the interface's MAC on it, cold-plugged; the taps are recorded before
        anything else can fail, so teardown finds them. The endpoints that got a NIC."""
        netns = self.record.netns
        model = self.config.runtime.internetworking_model
        queues = self._network_queues
        endpoints = await network.scan(netns)
        if endpoints and model != network.model.NONE and not self.capabilities.network:
            raise SandboxError(f"{netns}: interface {endpoints[0].name} cannot reach the VM: "
                               f"{self.hypervisor.name} has no network devices")
        plugged = []
        for index, endpoint in enumerate(endpoints):
            tap = await network.attach(netns, endpoint, model, queues=queues)
            if tap is None:  # internetworking_model = "none": the VM gets no NIC
                continue
            self.record.taps.append(tap)
            self.store.save(self.record)
            interface = endpoint.interface
            await self.hypervisor.add_device(NetworkDevice(f"net{index}", tap_name=tap, mac=interface.mac,
                                                           netns=self._tap_netns, mtu=interface.mtu or 1500,
                                                           queues=queues))
            plugged.append(endpoint)
        return plugged

    @property
    def _tap_netns(self) -> str:
        """Where the backend opens a NIC's tap: "" in the VMM's own netns (a cold boot started it
        in the pod's), else the pod's netns, the tap handed over by descriptor."""
        return "" if (self.hypervisor.netns or "") == self.record.netns else self.record.netns

    @property
    def _network_queues(self) -> int:
        """[hypervisor] network_queues: queue pairs per NIC (0, Kata's default: one)."""
        return max(self.hypervisor.config.network_queues, 1)

    async def _rescan_endpoints(self) -> None:
        """Kata's rescan on a later container create: an interface CNI added since boot gets a
        tap and a hot-plugged NIC, configured in the guest; a NIC whose interface is gone is
        unplugged and its tap removed. A backend that cannot hot-plug a NIC refuses the create
        by name, with nothing made."""
        netns = self.record.netns
        model = self.config.runtime.internetworking_model
        endpoints = await network.scan(netns)
        nics = [d for d in self.hypervisor.devices if isinstance(d, NetworkDevice)]
        plugged = {d.mac.lower() for d in nics}
        scanned = {e.interface.mac.lower() for e in endpoints}
        for device in [d for d in nics if d.mac.lower() not in scanned]:
            if self.capabilities.can_hotplug(DeviceKind.NETWORK):
                await self._unplug_nic(device)
            else:
                log.warning("sandbox %s: the interface behind NIC %s (MAC %s) left %s, but %s cannot "
                            "hot-unplug a NIC: it stays until the sandbox ends", self.id, device.id,
                            device.mac, netns, self.hypervisor.name)
        new = [e for e in endpoints if e.interface.mac.lower() not in plugged]
        if not new or model == network.model.NONE:
            return
        if not self.capabilities.can_hotplug(DeviceKind.NETWORK):
            raise SandboxError(f"{netns}: interface {new[0].name} appeared after sandbox {self.id!r} "
                               f"booted, and {self.hypervisor.name} cannot hot-plug a NIC")
        for endpoint in new:
            device = await self._plug_endpoint(endpoint, model)
            try:
                await self._configure_guest_network([endpoint])
            except BaseException:
                # the guest's refusal is the error to report; a tap left by a failed unplug
                # stays recorded, for teardown
                with contextlib.suppress(KabutoError):
                    await self._unplug_nic(device)
                raise

    async def _plug_endpoint(self, endpoint: network.Endpoint, model: str) -> NetworkDevice:
        """A tap for ``endpoint`` and a NIC hot-plugged on it; on failure neither stays."""
        queues = self._network_queues
        tap = await network.attach(self.record.netns, endpoint, model, queues=queues)
        assert tap is not None
        self.record.taps.append(tap)
        self.store.save(self.record)
        taken = {d.id for d in self.hypervisor.devices}
        device_id = next(f"net{n}" for n in range(len(taken) + 1) if f"net{n}" not in taken)
        device = NetworkDevice(device_id, tap_name=tap, mac=endpoint.interface.mac, netns=self._tap_netns,
                               mtu=endpoint.interface.mtu or 1500, queues=queues)
        try:
            await self.hypervisor.add_device(device)
        except BaseException:
            with contextlib.suppress(KabutoError):
                await self._drop_tap(tap)
            raise
        await self._persist_hypervisor()
        log.info("sandbox %s: %s hot-plugged as %s on %s", self.id, endpoint.name, device_id, tap)
        return device

    async def _unplug_nic(self, device: NetworkDevice) -> None:
        await self.hypervisor.remove_device(device)
        await self._persist_hypervisor()
        await self._drop_tap(device.tap_name)

    async def _drop_tap(self, tap: str) -> None:
        await network.detach(self.record.netns, tap)
        if tap in self.record.taps:
            self.record.taps.remove(tap)
        self.store.save(self.record)

    async def _configure_guest_network(self, endpoints: list[network.Endpoint]) -> None:
        """The guest's NICs get the pod's names, addresses, routes and neighbours (Kata's
        UpdateInterface, UpdateRoutes, AddARPNeighbors)."""
        if not endpoints:
            return
        for endpoint in endpoints:
            await self._agent_call("UpdateInterface", self.containers.update_interface(endpoint.interface))
        routes = [route for endpoint in endpoints for route in endpoint.routes]
        await self._agent_call("UpdateRoutes", self.containers.update_routes(routes))
        neighbors = [neighbor for endpoint in endpoints for neighbor in endpoint.neighbors]
        if neighbors:
            await self._agent_call("AddARPNeighbors", self.containers.add_arp_neighbors(neighbors))

    async def _joined_namespaces(self, container_id: str, bundle: Bundle) -> dict[str, str]:
        """Namespace type -> the guest container whose namespace a path in the spec means: the
        pod's sandbox container, named as CRI names it (/proc/<sandbox task pid>/ns/<type>, the
        pid containerd was told, the VMM's). Anything else is refused by name."""
        joined: dict[str, str] = {}
        where = f"{bundle.path / 'config.json'}: linux.namespaces"
        for kind, path in bundle.namespace_paths.items():
            if kind == "network":
                if not _same_namespace(path, self.record.netns or path):
                    raise BundleError(f"{where} ({kind}): {path} is not the network namespace of sandbox "
                                      f"{self.id!r} ({self.record.netns})")
                continue
            pids = await self.hypervisor.get_pids()
            if container_id == self.id or not pids or path != f"/proc/{pids[0]}/ns/{_PROC_NS[kind]}":
                raise BundleError(f"{where} ({kind}): {path} is not a namespace of sandbox {self.id!r}'s "
                                  "container, the only one a container in a VM can join")
            joined[kind] = self.id
        return joined

    def container(self, container_id: str) -> ContainerRecord:
        try:
            return self.record.containers[container_id]
        except KeyError:
            raise ContainerIdError(f"container {container_id!r} does not exist") from None

    async def start_container(self, container_id: str) -> None:
        container = self.container(container_id)
        if container.status != "created":
            raise SandboxError(f"cannot start container {container_id!r}: it is {container.status}")
        await self._agent_call("StartContainer", self.containers.start_container(container_id))
        container.status = "running"
        self.store.save(self.record)

    async def refresh_status(self, container_id: str) -> ContainerRecord:
        """Ask the agent whether the container's first process has exited (never blocks long)."""
        container = self.container(container_id)
        if not await self.vmm_running():
            container.status = "stopped"
        elif container.status in ("running", "paused") and self._containers is not None:
            status = await self.wait_process(container_id, INIT_EXEC_ID, timeout=STATUS_POLL)
            if status is not None:
                container.status, container.exit_status = "stopped", status
        self.store.save(self.record)
        return container

    async def kill(self, container_id: str, signal_number: int, *, exec_id: str = INIT_EXEC_ID,
                   all_processes: bool = False) -> None:
        container = self.container(container_id)
        if container.status == "stopped":
            raise SandboxError(f"container {container_id!r} is not running")
        await self._agent_call("SignalProcess", self.containers.signal_process(
            container_id, exec_id, signal_number, all_processes=all_processes))

    async def pause_container(self, container_id: str) -> None:
        """``runc pause``: every process of the running container freezes; status "paused"."""
        container = self.container(container_id)
        if container.status != "running":
            raise SandboxError(f"cannot pause container {container_id!r}: it is {container.status}")
        await self._agent_call("PauseContainer", self.containers.pause_container(container_id))
        container.status = "paused"
        self.store.save(self.record)

    async def resume_container(self, container_id: str) -> None:
        """``runc resume``: a paused container runs again."""
        container = self.container(container_id)
        if container.status != "paused":
            raise SandboxError(f"cannot resume container {container_id!r}: it is {container.status}, "
                               "not paused")
        await self._agent_call("ResumeContainer", self.containers.resume_container(container_id))
        container.status = "running"
        self.store.save(self.record)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """``runc update -r``: apply an OCI linux.resources object to the container's cgroup
        (a limit it leaves out stays; -1 lifts a memory or pids limit)."""
        container = self.container(container_id)
        if container.status == "stopped":
            raise SandboxError(f"cannot update container {container_id!r}: it is stopped")
        wanted = resource_sizing.updated(container.resources, resources)
        await self._fit_resources(container_id, wanted)
        await self._agent_call("UpdateContainer", self.containers.update_container(container_id, resources))
        container.resources = wanted
        self.store.save(self.record)

    async def _fit_resources(self, container_id: str, resources: dict[str, Any]) -> None:
        """Grow the VM to the configured size plus every container's limits (``container_id``
        with ``resources``), where the backend can resize; a pod over default_maxmemory is refused
        by name, and a VM that cannot grow is said so in the log."""
        table = self.hypervisor.config
        others = [c.resources for c in self.record.containers.values() if c.id != container_id]
        vcpus, memory = resource_sizing.pod_size(table.default_vcpus, table.default_memory,
                                                 [*others, resources])
        if table.default_maxmemory and memory > max(table.default_maxmemory, table.default_memory):
            raise SandboxError(
                f"container {container_id!r}: the pod needs {memory} MiB (default_memory "
                f"{table.default_memory} MiB plus its containers' memory limits), more than "
                f"default_maxmemory ({table.default_maxmemory} MiB)")
        if memory > table.default_memory:
            if self.capabilities.resize_memory:
                await self.hypervisor.resize_memory(memory)
                await self._persist_hypervisor()
            else:
                log.warning("sandbox %s: the VM stays at %d MiB (its containers' limits ask for %d): memory "
                            "hot-plug needs default_maxmemory above default_memory", self.id,
                            table.default_memory, memory)
        if vcpus > math.ceil(table.default_vcpus):
            if self.capabilities.resize_vcpu and vcpus > table.default_maxvcpus:
                log.warning("sandbox %s: its containers' CPU limits ask for %d vCPUs; it grows to "
                            "default_maxvcpus (%d)", self.id, vcpus, table.default_maxvcpus)
            if self.capabilities.resize_vcpu:
                _, after = await self.hypervisor.resize_vcpu(math.ceil(table.default_vcpus),
                                                             min(vcpus, table.default_maxvcpus))
                await self._persist_hypervisor()
                # the guest has no udev: its agent brings the hot-added CPUs online
                assert self.agent is not None
                try:
                    online = await self._agent_call("OnlineCpus",
                                                    self.agent.online_cpus(after, CPU_ONLINE_WAIT))
                except KabutoError as exc:  # an agent without OnlineCpus: the vCPUs stay offline
                    log.warning("sandbox %s: %d vCPUs plugged, not brought online: %s", self.id, after, exc)
                    return
                if online < after:
                    log.warning("sandbox %s: %d of %d vCPUs online in the guest", self.id, online, after)
            else:
                log.warning("sandbox %s: the VM stays at %g vCPUs (its containers' CPU limits ask for %d): "
                            "vCPU hot-plug needs default_maxvcpus above default_vcpus", self.id,
                            table.default_vcpus, vcpus)

    async def remove_container(self, container_id: str) -> None:
        container = self.container(container_id)
        if self._containers is not None and await self.vmm_running():
            await self._agent_call("RemoveContainer", self.containers.remove_container(container_id))
        await self._release_rootfs(container)
        self.record.containers.pop(container_id, None)
        self.store.save(self.record)

    async def _release_rootfs(self, container: ContainerRecord) -> None:
        kind = container.rootfs.get("kind")
        if kind == "shared" and self.record.shared_dir:
            await rootfs_delivery.unshare_container(Path(self.record.shared_dir), container.id)
        elif kind == "block":
            device = next((d for d in self.hypervisor.devices if d.id == container.rootfs["device_id"]), None)
            if device is not None and self.vm_alive and self.capabilities.can_hotplug(device.kind):
                with contextlib.suppress(KabutoError):
                    await self.hypervisor.remove_device(device)
            if not self.vm_alive or device is None:
                rootfs_delivery.remove_files(Path(container.rootfs["image"]))

    # -- processes ---------------------------------------------------------------------------
    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> int:
        container = self.container(container_id)
        if container.status != "running":
            raise SandboxError(f"cannot exec in container {container_id!r}: it is {container.status}")
        return await self._agent_call("ExecProcess", self.containers.exec_process(
            container_id, exec_id, json.dumps(process).encode()))

    async def wait_process(self, container_id: str, exec_id: str = INIT_EXEC_ID,
                           timeout: float | None = None) -> int | None:
        """The exit status (128+N for signal N); None if still running after ``timeout`` seconds.

        Without a timeout it waits as long as the process runs: each of the client's long polls
        is bounded, and a dead VM or channel fails the next one.
        """
        try:
            return await self._agent_call("WaitProcess", self.containers.wait_process(
                container_id, exec_id, timeout=timeout))
        except ContainerCallError:
            raise
        except AgentError:
            # the client's "no answer within the timeout" (the process still runs), unless
            # the channel or the VM is what failed
            if timeout is None or self.agent is None or self.agent.closed or not await self.vmm_running():
                raise
            return None

    async def read_output(self, container_id: str, exec_id: str, stream: str,
                          max_len: int = READ_CHUNK) -> bytes:
        """The next chunk of ``stream`` ("stdout" or "stderr"); b"" at end of file."""
        read = self.containers.read_stdout if stream == "stdout" else self.containers.read_stderr
        try:
            return await self._agent_call(f"Read{stream.capitalize()}", read(container_id, exec_id, max_len))
        except ContainerCallError as exc:
            # The agent forgets an exec'd process once it was waited for and its last bytes were
            # handed out, possibly before this read could see the end of file: gone means ended.
            if exc.code == Code.NOT_FOUND and exec_id:
                return b""
            raise

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> None:
        await self._agent_call("WriteStdin", self.containers.write_stdin(container_id, exec_id, data))

    async def resize_terminal(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._agent_call("TtyWinResize",
                               self.containers.tty_win_resize(container_id, exec_id, rows, cols))

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._agent_call("CloseStdin", self.containers.close_stdin(container_id, exec_id))

    async def list_processes(self, container_id: str) -> list[int]:
        self.container(container_id)
        return list(await self._agent_call("ListProcesses", self.containers.list_processes(container_id)))

    async def release_container(self, container_id: str) -> None:
        """Forget a container of a dead VM: only host resources remain to be released."""
        await self._release_rootfs(self.container(container_id))
        self.record.containers.pop(container_id, None)
        self.store.save(self.record)

    async def release_host_resources(self) -> None:
        """After the VMM died: unmount and delete what the containers held on the host."""
        for container in self.record.containers.values():
            await self._release_rootfs(container)
            container.rootfs = {}

    # -- teardown ----------------------------------------------------------------------------
    async def destroy(self) -> None:
        """Stop the VM and remove everything: mounts, images, VM directory, state."""
        if self._containers is not None and await self.vmm_running():
            with contextlib.suppress(KabutoError, OSError, TimeoutError):
                await self.containers.destroy_sandbox()
        await self._teardown()

    async def _teardown(self) -> None:
        await self._close_agent()
        with contextlib.suppress(HypervisorError, OSError):
            await self.hypervisor.stop_vm()
        await self.hypervisor.cleanup()
        await _unplug_endpoints(self.record)
        _leave_host_cgroup(self.record)
        errors: list[str] = []
        for container in list(self.record.containers.values()):
            try:
                await self._release_rootfs(container)
            except RootfsError as exc:
                errors.append(str(exc))
        if self.record.shared_dir:
            shared = Path(self.record.shared_dir)
            for child in rootfs_delivery.list_dir(shared):
                with contextlib.suppress(RootfsError):
                    await rootfs_delivery.unshare_container(shared, child.name)
            cache_store.forget_shared(self.store, shared)
        rootfs_delivery.remove_files(*self.directory.glob("*.ext4"))
        self.store.remove(self.id)
        if errors:
            raise SandboxError(f"sandbox {self.id!r} removed, but: " + "; ".join(errors))


async def _take_warm(request: factory.WarmRequest,
                     block_rootfs: list[tuple[str, Bundle]] | None) -> tuple[Hypervisor | None, str]:
    """A warm VM from the configured factory and the source's name, or (None, "") to boot cold
    (the source logged why)."""
    source = factory.warm_source(request.resolved)
    if source is None:
        return None, ""
    if not request.shares and block_rootfs:
        # a rootfs disk is cold-plugged at boot; a warm VM would need it hot-plugged
        log.warning("sandbox %s: booting cold: the %s factory needs a shared filesystem for the rootfs",
                    request.sandbox_id, source.name)
        return None, ""
    warm = await source.take(request)
    return warm, source.name if warm is not None else ""


async def create_sandbox_for(
    container_id: str,
    bundle: Bundle,
    store: StateStore,
    *,
    config_path: str | None = None,
    hypervisor_name: str | None = None,
    hostname: str = "",
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    owner: dict[str, Any] | None = None,
    host_cgroup_by_caller: bool = False,
) -> VirtSandbox:
    """A sandbox of its own for ``container_id`` (named after it), with the container created
    in it: what ``kabuto create``, containerd's first task and the Python API all start with.

    The bundle's annotations override configuration keys; ``owner`` names a long-lived process
    that manages the sandbox (the shim). Any failure leaves nothing: no VM, record or mount.
    What a killed creator left half made is cleaned first, so its id is free again.
    """
    await reap_abandoned(store)
    store.reserve(SandboxRecord(id=container_id, hypervisor_name=hypervisor_name or "",
                                config_path=config_path, owner=dict(owner or {}),
                                creator=process_record(os.getpid())), [container_id])
    sandbox = await VirtSandbox.create(
        container_id, store, config_path=config_path, hypervisor_name=hypervisor_name,
        annotations=bundle.annotations, hostname=hostname, netns=bundle.network_namespace,
        block_rootfs=[(container_id, bundle)],
        boot_timeout=boot_timeout, cgroups_path=bundle.spec.get("linux", {}).get("cgroupsPath"))
    try:
        await sandbox.create_container(container_id, bundle, host_cgroup_by_caller=host_cgroup_by_caller)
    except BaseException:
        await sandbox.destroy()
        raise
    return sandbox


async def _unplug_endpoints(record: SandboxRecord) -> None:
    """Remove the taps and tc filters the sandbox made in its netns (a netns CNI already deleted
    took them with it)."""
    if record.taps:
        await network.detach_all(record.netns, record.taps)
        record.taps = []


def _leave_host_cgroup(record: SandboxRecord) -> None:
    """Out of the sandbox's host cgroup (its creator moves back), its directories removed."""
    if record.host_cgroup:
        host_cgroup.leave(record.host_cgroup, os.getpid())
        record.host_cgroup = {}


#: namespace type -> its file under /proc/<pid>/ns
_PROC_NS = {"ipc": "ipc", "uts": "uts", "pid": "pid", "network": "net"}


def _same_namespace(first: str, second: str) -> bool:
    try:
        a, b = os.stat(first), os.stat(second)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_netns(path: str) -> None:
    """A network namespace the VMM can enter: an nsfs file of a network namespace (as ``ip netns
    add`` or CNI makes; not another kind's, nor the empty mount point CNI leaves behind)."""
    try:
        network.check_netns(path)
    except network.NetworkError as exc:
        raise BundleError(str(exc)) from None


def new_sandbox_id(prefix: str = "sb") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def describe(record: SandboxRecord) -> dict[str, Any]:
    return asdict(record)


async def reap_abandoned(store: StateStore) -> list[str]:
    """Remove every sandbox its creator left half made when it died (``kill -9`` of a CLI or an
    API program mid-create or mid-boot): its VMM and helpers, shares, taps, files. Each one is
    reported (a warning naming it and the dead creator) and its id is returned. A sandbox
    another process is busy with (its lock held) is left for later."""
    reaped: list[str] = []
    for sandbox_id in store.sandbox_ids():
        try:
            record = store.load(sandbox_id)
            if not record.abandoned():
                continue
            with store.sandbox_lock(sandbox_id, timeout=0):
                record = store.load(sandbox_id)
                if not record.abandoned():
                    continue
                if record.hypervisor_state:
                    sandbox = await VirtSandbox.attach(sandbox_id, store)
                    await sandbox.hypervisor.cleanup()
                await remove_dead_sandbox(store, sandbox_id)
        except (ContainerIdError, StateError):
            continue  # gone meanwhile, or busy: another process is at it
        log.warning("sandbox %r was left half created by pid %s, which died: removed what it left "
                    "(VMM, shares, files)", sandbox_id, record.creator.get("pid"))
        reaped.append(sandbox_id)
    return reaped


async def remove_dead_sandbox(store: StateStore, sandbox_id: str) -> None:
    """Clean up after a sandbox whose creator died mid-creation (no hypervisor state saved): the
    processes it may have spawned for the VM (found by the VM directory they name), shares, files."""
    record = store.load(sandbox_id)
    # a VM from the factory cache has an id of its own, recorded as the daemon handed it out
    vm_dir = store.jailer_root / vm_dir_name(record.hypervisor_state.get("id") or sandbox_id)
    await kill_processes_naming(vm_dir)
    await _unplug_endpoints(record)
    _leave_host_cgroup(record)
    shared = Path(record.shared_dir) if record.shared_dir else None
    if shared is not None:
        for child in rootfs_delivery.list_dir(shared):
            await rootfs_delivery.unshare_container(shared, child.name)
        cache_store.forget_shared(store, shared)
    if vm_dir.is_dir():
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)
    rootfs_delivery.remove_files(*store.sandbox_dir(sandbox_id).glob("*.ext4"))
    store.remove(sandbox_id)
