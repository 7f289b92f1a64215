"""Host-side client of the guest's ContainerService (sandbox, containers, processes).

``ContainerClient(agent_client)`` shares the AgentClient's ttrpc connection. Every call
is bounded: ordinary calls by the agent client's call timeout, the waits that may last
as long as a process does (wait_process, read_stdout/read_stderr, write_stdin) by polls
of at most ``poll_interval`` seconds each, repeated until the answer or the caller's
``timeout`` (None: for as long as the guest answers). The guest answers a poll that found
nothing with DEADLINE_EXCEEDED just before the poll's deadline, having consumed nothing,
so polling again loses no byte. A dead guest or channel fails the next poll at the latest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

from kabuto.agent.client import AgentClient
from kabuto.errors import AgentError, KabutoError
from kabuto.protos import CONTAINER_SERVICE
from kabuto.protos import containers_pb2 as pb
from kabuto.ttrpc import Code, RpcError

DEFAULT_POLL_INTERVAL = 30.0
# Per-call chunk for stdin, output and file copies (the guest accepts at most 1 MiB).
MAX_CHUNK = 1 << 20
# The most copy_file_out reads unless told otherwise; the guest is untrusted.
DEFAULT_MAX_FILE_SIZE = 64 << 20
# The most addresses of an interface and routes an answer may list (the guest is untrusted).
MAX_ANSWERED_ADDRESSES = 1024
MAX_ANSWERED_ROUTES = 4096

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Storage:
    """A filesystem the guest mounts: a 9p tag, a block device..."""

    source: str
    mount_point: str
    fstype: str
    options: Sequence[str] = ()

    def to_message(self) -> pb.Storage:
        return pb.Storage(
            source=self.source, mount_point=self.mount_point, fstype=self.fstype, options=list(self.options)
        )


@dataclass(frozen=True)
class IPAddress:
    address: str  # "10.88.0.5", "fd00::5"
    prefix_length: int


@dataclass(frozen=True)
class Interface:
    """A pod interface as the guest has it: found by ``mac``, named, addressed (mtu 0: as it is)."""

    name: str
    mac: str
    addresses: Sequence[IPAddress] = ()
    mtu: int = 0

    def to_message(self) -> pb.Interface:
        return pb.Interface(
            name=self.name,
            mac=self.mac,
            mtu=self.mtu,
            addresses=[
                pb.IPAddress(address=a.address, prefix_length=a.prefix_length)
                for a in self.addresses
            ],
        )

    @classmethod
    def from_message(cls, message: pb.Interface) -> Interface:
        if len(message.addresses) > MAX_ANSWERED_ADDRESSES:
            raise AgentError(f"the guest answered {len(message.addresses)} addresses for {message.name!r}")
        addresses = tuple(IPAddress(a.address, a.prefix_length) for a in message.addresses)
        return cls(message.name, message.mac, addresses, message.mtu)


@dataclass(frozen=True)
class Route:
    """A route of the pod's netns; destination "default" (or "") for the default route."""

    destination: str
    gateway: str = ""  # "": a link route
    device: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_*: 0 universe, 253 link

    def to_message(self) -> pb.Route:
        return pb.Route(
            destination=self.destination,
            gateway=self.gateway,
            device=self.device,
            source=self.source,
            scope=self.scope,
        )

    @classmethod
    def from_message(cls, message: pb.Route) -> Route:
        return cls(message.destination, message.gateway, message.device, message.source, message.scope)


@dataclass(frozen=True)
class ARPNeighbor:
    """A permanent neighbour entry: ``ip_address`` is at ``mac`` on ``device``."""

    ip_address: str
    device: str
    mac: str

    def to_message(self) -> pb.ARPNeighbor:
        return pb.ARPNeighbor(ip_address=self.ip_address, device=self.device, mac=self.mac)


@dataclass(frozen=True)
class ContainerStats:
    """Numbers from the container's cgroup; None where the guest cannot tell."""

    cpu_usage_usec: int | None
    cpu_user_usec: int | None
    cpu_system_usec: int | None
    memory_usage_bytes: int | None
    memory_limit_bytes: int | None  # None: no limit
    pids_current: int | None
    pids_limit: int | None  # None: no limit
    memory_oom_kills: int | None  # processes of the container the guest's OOM killer took

    @classmethod
    def from_message(cls, message: pb.StatsContainerResponse) -> ContainerStats:
        return cls(
            **{
                name: getattr(message, name) if message.HasField(name) else None
                for name in cls.__annotations__
            }
        )


class ContainerClient:
    """ContainerService calls over an AgentClient's connection."""

    #: the shortest time between two long polls of one wait (see _poll)
    MIN_POLL_SECONDS = 0.05

    def __init__(self, agent: AgentClient, *, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.agent = agent
        self.poll_interval = poll_interval

    async def _call(
        self, method: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> M:
        try:
            return await self.agent._ttrpc.call(
                CONTAINER_SERVICE, method, request, response_type, timeout=timeout or self.agent.call_timeout
            )
        except RpcError as exc:
            raise ContainerCallError(self.agent.address, method, exc.code, exc.message) from exc
        except KabutoError as exc:
            raise AgentError(f"agent at {self.agent.address}: {method} failed: {exc}") from exc

    async def _poll(self, method: str, request: Message, response_type: type[M], timeout: float | None) -> M:
        """Call a long-polling method until it answers, for at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            poll = self.poll_interval if deadline is None else min(self.poll_interval, deadline - loop.time())
            if poll <= 0:
                raise AgentError(f"agent at {self.agent.address}: {method}: no answer within {timeout:g}s")
            asked = loop.time()
            try:
                return await self._call(method, request, response_type, poll)
            except ContainerCallError as exc:
                if exc.code != Code.DEADLINE_EXCEEDED:
                    raise
            # a guest that answers "nothing yet" at once would have the host spin: poll no faster
            # than MIN_POLL_SECONDS
            pause = self.MIN_POLL_SECONDS - (loop.time() - asked)
            if deadline is not None:
                pause = min(pause, deadline - loop.time())
            if pause > 0:
                await asyncio.sleep(pause)

    # --- sandbox ---------------------------------------------------------------------

    async def create_sandbox(
        self, *, hostname: str = "", storages: Sequence[Storage] = (), sandbox_id: str = "",
        timeout: float | None = None,
    ) -> None:
        request = pb.CreateSandboxRequest(
            hostname=hostname, storages=[s.to_message() for s in storages], sandbox_id=sandbox_id
        )
        await self._call("CreateSandbox", request, pb.CreateSandboxResponse, timeout)

    async def destroy_sandbox(self, timeout: float | None = None) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), pb.DestroySandboxResponse, timeout)

    # --- containers --------------------------------------------------------------------

    async def create_container(
        self,
        container_id: str,
        oci_spec: bytes | Mapping[str, Any],
        *,
        rootfs: Storage | None = None,
        timeout: float | None = None,
    ) -> int:
        """Like ``runc create``; ``oci_spec``: config.json (bytes or parsed) with root.path
        the rootfs's guest path. Returns the init process's PID in the guest."""
        raw = oci_spec if isinstance(oci_spec, bytes) else json.dumps(oci_spec).encode()
        request = pb.CreateContainerRequest(container_id=container_id, oci_spec_json=raw)
        if rootfs is not None:
            request.rootfs.CopyFrom(rootfs.to_message())
        response = await self._call("CreateContainer", request, pb.CreateContainerResponse, timeout)
        return response.pid

    async def start_container(self, container_id: str, timeout: float | None = None) -> int:
        request = pb.StartContainerRequest(container_id=container_id)
        return (await self._call("StartContainer", request, pb.StartContainerResponse, timeout)).pid

    async def remove_container(self, container_id: str, timeout: float | None = None) -> None:
        request = pb.RemoveContainerRequest(container_id=container_id)
        await self._call("RemoveContainer", request, pb.RemoveContainerResponse, timeout)

    async def pause_container(self, container_id: str, timeout: float | None = None) -> None:
        """Like ``runc pause``: returns once every process of the container is frozen."""
        request = pb.PauseContainerRequest(container_id=container_id)
        await self._call("PauseContainer", request, pb.PauseContainerResponse, timeout)

    async def resume_container(self, container_id: str, timeout: float | None = None) -> None:
        request = pb.ResumeContainerRequest(container_id=container_id)
        await self._call("ResumeContainer", request, pb.ResumeContainerResponse, timeout)

    async def update_container(self, container_id: str, resources: bytes | Mapping[str, Any]) -> None:
        """Like ``runc update -r``; ``resources``: an OCI linux.resources object (or its JSON)."""
        raw = resources if isinstance(resources, bytes) else json.dumps(resources).encode()
        request = pb.UpdateContainerRequest(container_id=container_id, resources=raw)
        await self._call("UpdateContainer", request, pb.UpdateContainerResponse)

    async def list_processes(self, container_id: str) -> list[int]:
        request = pb.ListProcessesRequest(container_id=container_id)
        return list((await self._call("ListProcesses", request, pb.ListProcessesResponse)).pids)

    async def stats_container(self, container_id: str) -> ContainerStats:
        request = pb.StatsContainerRequest(container_id=container_id)
        return ContainerStats.from_message(
            await self._call("StatsContainer", request, pb.StatsContainerResponse)
        )

    # --- processes -----------------------------------------------------------------------

    async def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process: bytes | Mapping[str, Any],
        timeout: float | None = None,
    ) -> int:
        """Like ``runc exec``; ``process``: an OCI process object. Returns its PID."""
        raw = process if isinstance(process, bytes) else json.dumps(process).encode()
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id, process_json=raw)
        return (await self._call("ExecProcess", request, pb.ExecProcessResponse, timeout)).pid

    async def wait_process(self, container_id: str, exec_id: str = "", timeout: float | None = None) -> int:
        """The exit status (128+N when killed by signal N) once the process has exited."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        return (await self._poll("WaitProcess", request, pb.WaitProcessResponse, timeout)).exit_status

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, *, all_processes: bool = False
    ) -> None:
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=int(signal), all=all_processes
        )
        await self._call("SignalProcess", request, pb.SignalProcessResponse)

    # --- stdio ------------------------------------------------------------------------------

    async def write_stdin(
        self, container_id: str, exec_id: str, data: bytes, timeout: float | None = None
    ) -> int:
        """Write all of ``data`` (in chunks, each waiting for room); returns len(data)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        view = memoryview(data)
        written = 0
        while written < len(view) or not view:
            remaining = None if deadline is None else deadline - loop.time()
            chunk = bytes(view[written : written + MAX_CHUNK])
            request = pb.WriteStdinRequest(container_id=container_id, exec_id=exec_id, data=chunk)
            response = await self._poll("WriteStdin", request, pb.WriteStdinResponse, remaining)
            if response.written > len(chunk):
                raise AgentError(f"agent at {self.agent.address}: WriteStdin claims more than it was given")
            written += response.written
            if not view:
                break
        return written

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        request = pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", request, pb.CloseStdinResponse)

    async def read_stdout(
        self, container_id: str, exec_id: str = "", max_len: int = MAX_CHUNK, timeout: float | None = None
    ) -> bytes:
        """Some output once there is any (at most ``max_len`` bytes); b"" at end of file."""
        return await self._read("ReadStdout", container_id, exec_id, max_len, timeout)

    async def read_stderr(
        self, container_id: str, exec_id: str = "", max_len: int = MAX_CHUNK, timeout: float | None = None
    ) -> bytes:
        return await self._read("ReadStderr", container_id, exec_id, max_len, timeout)

    async def _read(
        self, method: str, container_id: str, exec_id: str, max_len: int, timeout: float | None
    ) -> bytes:
        max_len = max(1, min(max_len, MAX_CHUNK))
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, max_len=max_len)
        data = (await self._poll(method, request, pb.ReadStreamResponse, timeout)).data
        if len(data) > max_len:
            raise AgentError(
                f"agent at {self.agent.address}: {method} sent {len(data)} bytes, asked {max_len}"
            )
        return data

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        request = pb.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, rows=rows, cols=cols)
        await self._call("TtyWinResize", request, pb.TtyWinResizeResponse)

    # --- the pod's network -------------------------------------------------------------------

    async def update_interface(self, interface: Interface, timeout: float | None = None) -> Interface:
        """Configure the guest NIC whose MAC is ``interface.mac`` (the guest waits a little for a
        hot-plugged one); returns it as the guest now has it."""
        request = pb.UpdateInterfaceRequest(interface=interface.to_message())
        return Interface.from_message(await self._call("UpdateInterface", request, pb.Interface, timeout))

    async def update_routes(self, routes: Sequence[Route], timeout: float | None = None) -> list[Route]:
        """The guest's routes on the devices named become ``routes``; returns the routes those
        devices have now (the kernel's own for their addresses too)."""
        request = pb.UpdateRoutesRequest(routes=[r.to_message() for r in routes])
        response = await self._call("UpdateRoutes", request, pb.UpdateRoutesResponse, timeout)
        if len(response.routes) > MAX_ANSWERED_ROUTES:
            raise AgentError(
                f"agent at {self.agent.address}: UpdateRoutes answered {len(response.routes)} routes"
            )
        return [Route.from_message(r) for r in response.routes]

    async def add_arp_neighbors(self, neighbors: Sequence[ARPNeighbor], timeout: float | None = None) -> None:
        request = pb.AddARPNeighborsRequest(neighbors=[n.to_message() for n in neighbors])
        await self._call("AddARPNeighbors", request, pb.AddARPNeighborsResponse, timeout)

    # --- files ---------------------------------------------------------------------------------

    async def copy_file_in(
        self, path: str, data: bytes, mode: int = 0o644, *, container_id: str = ""
    ) -> None:
        """Write ``data`` as the file ``path`` (inside the container when ``container_id``)."""
        offset = 0
        while True:
            chunk = data[offset : offset + MAX_CHUNK]
            request = pb.CopyFileInRequest(
                path=path, data=chunk, mode=mode, offset=offset, container_id=container_id
            )
            await self._call("CopyFileIn", request, pb.CopyFileInResponse)
            offset += len(chunk)
            if offset >= len(data):
                return

    async def copy_file_out(
        self, path: str, *, container_id: str = "", max_size: int = DEFAULT_MAX_FILE_SIZE
    ) -> bytes:
        """The whole file ``path``; an AgentError if it is larger than ``max_size``."""
        content = bytearray()
        while True:
            request = pb.CopyFileOutRequest(
                path=path, offset=len(content), max_len=MAX_CHUNK, container_id=container_id
            )
            response = await self._call("CopyFileOut", request, pb.CopyFileOutResponse)
            if response.size > max_size or len(response.data) > MAX_CHUNK:
                raise AgentError(f"{path} in the guest is larger than {max_size} bytes")
            content += response.data
            if not response.data or len(content) >= response.size:
                return bytes(content)


class ContainerCallError(AgentError):
    """The guest answered a ContainerService call with an error status."""

    def __init__(self, address: object, method: str, code: int, message: str) -> None:
        self.code = code
        self.message = message  # the guest's own words, e.g. runc-like "exec: ..."
        super().__init__(f"agent at {address}: {method} failed: {message}")
