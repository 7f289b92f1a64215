"""The one Hypervisor interface every VMM backend implements (after Kata runtime-rs)."""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable, UnsupportedOperation
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.hypervisor.devices import AgentChannel, AnyDevice, device_from_dict, device_to_dict

if TYPE_CHECKING:
    from kabuto.hypervisor.plugin import HypervisorPlugin

DEFAULT_JAILER_ROOT = Path("/run/kabuto/vm")
#: Every guest kernel's: a panic reboots and the reboot ends the VMM; an oops panics, since it leaves
#: the kernel half-alive (an oops in virtio-fs's completion worker hangs every later access to the
#: share, and with it the agent's container set-up, until the caller's deadline)
GUEST_PANIC_PARAMS = "panic=1 oops=panic"
#: A VM directory's name is at most this long: its sockets (QMP, agent ports and their locks,
#: virtiofsd's) must fit sun_path's 107 bytes under any sane jailer root, with any VM id (CRI's
#: are 64 hex digits). Longer ids are shortened to a prefix and a hash of the whole id.
MAX_VM_DIR_NAME = 20
VM_DIR_PREFIX = 6


def vm_dir_name(vm_id: str) -> str:
    """The VM's directory name under the jailer root: the id itself when short enough, else
    ``<first 6 characters>-<13 hex digits of its SHA-256>`` (distinct ids stay distinct)."""
    if len(vm_id) <= MAX_VM_DIR_NAME:
        return vm_id
    digest = hashlib.sha256(vm_id.encode()).hexdigest()
    return f"{vm_id[:VM_DIR_PREFIX]}-{digest[:MAX_VM_DIR_NAME - VM_DIR_PREFIX - 1]}"


class VmStatus(enum.StrEnum):
    NEW = "new"
    PREPARED = "prepared"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class HypervisorState:
    """What ``save_state`` returns: enough for another process to find and drive the VM, with
    the effective table it booted with (after annotations and the plugin's adjust), as Kata
    keeps HypervisorConfig in its hypervisor state."""

    hypervisor_name: str
    id: str
    status: str
    vm_path: str
    jailer_root: str
    pids: list[int] = field(default_factory=list)
    agent_socket: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> HypervisorConfig:
        return HypervisorConfig.model_validate(self.config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HypervisorState:
        return cls(**data)


@dataclass
class VcpuThreadIds:
    """vCPU index -> host thread id."""

    vcpus: dict[int, int] = field(default_factory=dict)


class Hypervisor(abc.ABC):
    """Async VMM control. One instance drives one VM."""

    #: registry name of the backend ("qemu", "cloud-hypervisor" ...)
    name: ClassVar[str]
    #: what the backend can do at all; an instance's ``capabilities`` is this as its table
    #: configures it (the plugin's capabilities_for)
    capabilities: Capabilities
    #: the plugin of the backend's own package, for a backend built without the registry
    default_plugin: ClassVar[HypervisorPlugin | None] = None

    def __init__(self, config: HypervisorConfig, jailer_root: Path = DEFAULT_JAILER_ROOT, *,
                 plugin: HypervisorPlugin | None = None) -> None:
        self.config = config
        chosen = plugin if plugin is not None else self.default_plugin
        if chosen is None:
            raise HypervisorError(f"{self.name}: built without its plugin "
                                  "(build it with kabuto.hypervisor.new_hypervisor)")
        #: the plugin the registry resolved this backend's name to (its availability rules)
        self.plugin: HypervisorPlugin = chosen
        self.capabilities = chosen.capabilities_for(config)
        self.jailer_root = Path(jailer_root)
        self.id = ""
        self.netns: str | None = None
        self.status = VmStatus.NEW
        self.pending_devices: list[AnyDevice] = []
        self.devices: list[AnyDevice] = []
        #: set by prepare_vm: where the guest agent is reached
        self.agent_channel: AgentChannel | None = None
        #: phase -> seconds since start_vm began, for backends that can tell (shown by `vm boot`)
        self.boot_timings: dict[str, float] = {}

    # -- helpers shared by the backends ---------------------------------------------------
    @property
    def vm_path(self) -> Path:
        """Per-VM directory under the jailer root: sockets, logs and state live here."""
        return self.jailer_root / vm_dir_name(self.id)

    def _error(self, message: str) -> HypervisorError:
        return HypervisorError(f"{self.name}: {message}")

    def _unsupported(self, operation: str) -> UnsupportedOperation:
        return UnsupportedOperation(f"{self.name}: {operation} is not supported by this VMM")

    def _require(self, *allowed: VmStatus, operation: str) -> None:
        if self.status not in allowed:
            wanted = " or ".join(s.value for s in allowed)
            raise self._error(f"cannot {operation}: VM is {self.status.value}, needs {wanted}")

    def _check_hotplug(self, device: AnyDevice) -> None:
        if not self.capabilities.can_hotplug(device.kind):
            raise self._unsupported(f"hot-plugging a {device.kind.value} device")

    async def add_device(self, device: AnyDevice) -> AnyDevice:
        """Cold-plug (pending list) before boot; hot-plug after, where capabilities allow."""
        if self.status in (VmStatus.NEW, VmStatus.PREPARED):
            self.pending_devices.append(device)
            return device
        self._require(VmStatus.RUNNING, operation=f"add {device.kind.value} device {device.id}")
        self._check_hotplug(device)
        await self._hotplug_add(device)
        self.devices.append(device)
        return device

    async def remove_device(self, device: AnyDevice) -> None:
        pending = [d for d in self.pending_devices if d.id == device.id]
        if pending:
            self.pending_devices.remove(pending[0])
            return
        plugged = [d for d in self.devices if d.id == device.id]
        if not plugged:
            raise self._error(f"no device with id {device.id!r}")
        self._require(VmStatus.RUNNING, operation=f"remove device {device.id}")
        self._check_hotplug(plugged[0])
        await self._hotplug_remove(plugged[0])
        self.devices.remove(plugged[0])

    # -- resizing (Kata runtime-rs: resize_vcpu, resize_memory) --------------------------------
    async def resize_vcpu(self, old: int, new: int) -> tuple[int, int]:
        """Grow the VM to ``new`` vCPUs (``old``: what the caller believes it has); returns
        (vCPUs before, vCPUs after). Never shrinks. Where ``capabilities.resize_vcpu``."""
        if not self.capabilities.resize_vcpu:
            raise self._unsupported(f"resizing vCPUs ({old} -> {new})")
        self._require(VmStatus.RUNNING, operation="resize vCPUs")
        return await self._resize_vcpu(old, new)

    async def resize_memory(self, new_mib: int) -> int:
        """Grow the VM's memory to at least ``new_mib`` MiB (within default_maxmemory); returns
        the MiB it has after. Never shrinks. Where ``capabilities.resize_memory``."""
        if not self.capabilities.resize_memory:
            raise self._unsupported(f"resizing memory (to {new_mib} MiB)")
        self._require(VmStatus.RUNNING, operation="resize memory")
        return await self._resize_memory(new_mib)

    async def _resize_vcpu(self, old: int, new: int) -> tuple[int, int]:
        raise self._unsupported("resizing vCPUs")

    async def _resize_memory(self, new_mib: int) -> int:
        raise self._unsupported("resizing memory")

    async def hypervisor_config(self) -> HypervisorConfig:
        return self.config

    async def _state(self, extra: dict[str, Any] | None = None) -> HypervisorState:
        """What every backend's ``save_state`` records (``restore`` reads it back), plus the
        backend's own ``extra``."""
        return HypervisorState(
            hypervisor_name=self.name,
            id=self.id,
            status=self.status.value,
            vm_path=str(self.vm_path),
            jailer_root=str(self.jailer_root),
            pids=await self.get_pids(),
            agent_socket=self.agent_channel.url() if self.agent_channel else "",
            config=self.config.model_dump(mode="json"),
            extra={
                "netns": self.netns,
                "agent": device_to_dict(self.agent_channel) if self.agent_channel else None,
                "devices": [device_to_dict(d) for d in self.devices],
                "pending_devices": [device_to_dict(d) for d in self.pending_devices],
                **(extra or {}),
            },
        )

    async def get_jailer_root(self) -> str:
        return str(self.jailer_root)

    # -- the interface ----------------------------------------------------------------------
    @abc.abstractmethod
    async def prepare_vm(self, id: str, netns: str | None = None) -> None:
        """Create the VM directory and sockets; put the agent channel on the pending list."""

    @abc.abstractmethod
    async def start_vm(self, timeout: float, restore_from: Path | None = None) -> None:
        """Launch the VMM, plug pending devices and boot, all within ``timeout`` seconds.

        With ``restore_from`` (what ``save_vm`` returned) the VM resumes from that state
        instead of booting; backends without snapshots raise UnsupportedOperation.
        """

    @abc.abstractmethod
    async def stop_vm(self) -> None:
        """Stop the guest: gracefully, then forced."""

    @abc.abstractmethod
    async def pause_vm(self) -> None: ...

    @abc.abstractmethod
    async def resume_vm(self) -> None: ...

    @abc.abstractmethod
    async def save_vm(self) -> Path:
        """Save the (paused) VM's state to a file under the VM directory and return it."""

    async def get_agent_socket(self) -> str:
        """``unix:///path``, ``vsock://CID:PORT`` or ``hvsock:///path:PORT``."""
        if self.agent_channel is None:
            raise self._error("no agent channel: call prepare_vm first")
        return self.agent_channel.url()

    async def get_agent_sockets(self) -> list[str]:
        """Every address of the agent, the primary one first. A channel that takes one host
        connection at a time (virtio-serial) comes as several, so that several host processes
        reach the agent at once; a vsock or hybrid-vsock channel takes many and is one address."""
        return [await self.get_agent_socket()]

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Drop control connections (QMP, API client) without stopping the VM."""

    async def release(self) -> None:
        """Let the VM go to another process without stopping it (a VM factory hands it out):
        control connections and this process's watchers end; the VM and its helpers run on."""
        await self.disconnect()

    @abc.abstractmethod
    async def get_thread_ids(self) -> VcpuThreadIds: ...

    @abc.abstractmethod
    async def get_pids(self) -> list[int]:
        """The VMM's and its helpers' process ids (never vCPU threads)."""

    @abc.abstractmethod
    async def cleanup(self) -> None:
        """Remove everything this backend made on the host; safe to call twice."""

    def exit_reason(self) -> str:
        """How the VMM process ended ("... was killed by signal 9"), where this process can tell
        (it spawned the VMM); "" otherwise."""
        return ""

    async def check(self) -> None:
        """Raise HypervisorUnavailable naming the reason if this host cannot run the VMM."""
        reasons = self._unavailability_reasons()
        if reasons:
            raise HypervisorUnavailable(f"{self.name}: " + "; ".join(reasons))

    def _unavailability_reasons(self) -> list[str]:
        availability = self.plugin.availability(self.config)
        reasons = [] if availability.available else list(availability.reasons)
        if self.config.kernel and not Path(self.config.kernel).is_file():
            reasons.append(f"guest kernel {self.config.kernel} does not exist")
        return reasons

    @abc.abstractmethod
    async def save_state(self) -> HypervisorState: ...

    @classmethod
    async def restore(cls, state: HypervisorState, *, jailer_root: Path = DEFAULT_JAILER_ROOT,
                      plugin: HypervisorPlugin | None = None) -> Self:
        """Rebuild a backend driving the VM described by ``state`` (saved by another process),
        with the table saved in it: never the configuration file as it reads now."""
        if state.hypervisor_name != cls.name:
            raise HypervisorError(f"{cls.name}: cannot restore state saved by {state.hypervisor_name!r}")
        self = cls(state.table(), Path(state.jailer_root or jailer_root), plugin=plugin)
        self.id = state.id
        if Path(state.vm_path) != self.vm_path:
            raise self._error(f"saved VM path {state.vm_path} does not match {self.vm_path}")
        extra = state.extra
        self.status = VmStatus(state.status)
        self.netns = extra.get("netns")
        agent = device_from_dict(extra["agent"]) if extra.get("agent") else None
        self.agent_channel = agent if isinstance(agent, AgentChannel) else None
        self.devices = [device_from_dict(d) for d in extra.get("devices", [])]
        self.pending_devices = [device_from_dict(d) for d in extra.get("pending_devices", [])]
        await self._take_over(state)
        return self

    @abc.abstractmethod
    async def _take_over(self, state: HypervisorState) -> None:
        """``restore``'s own part: adopt the processes ``state`` names and reconnect; a VM that
        is gone comes back STOPPED."""

    # -- VM templates (where ``capabilities.template``) --------------------------------------
    async def save_template(self, memory: Path, state: Path, timeout: float,
                            warm_up: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Boot the prepared VM (no sandbox device) to agent-ready with its RAM in the file
        ``memory``, run ``warm_up`` (the caller's agent calls), pause it, save its device state
        (without the RAM) into ``state`` and stop it. Returns the backend's facts a clone must
        match (checked by ``start_from_template``)."""
        raise self._unsupported("making a VM template")

    async def start_from_template(self, memory: Path, state: Path, facts: dict[str, Any],
                                  timeout: float) -> None:
        """Start the prepared VM as a clone of a template: RAM mapped copy-on-write from
        ``memory``, devices from ``state``; its pending devices arrive by hot-plug once it runs."""
        raise self._unsupported("starting a VM from a template")

    async def _hotplug_add(self, device: AnyDevice) -> None:
        raise self._unsupported(f"hot-plugging a {device.kind.value} device")

    async def _hotplug_remove(self, device: AnyDevice) -> None:
        raise self._unsupported(f"hot-unplugging a {device.kind.value} device")

