"""AgentService: the methods the host calls (health, guest details, shutdown, freshening a
restored guest: entropy and clock)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import kabuto
from kabuto.guest import freshen
from kabuto.protos import agent_pb2
from kabuto.ttrpc import Code, Method, RpcError, unary_method

# Lets the Shutdown answer leave the guest before the power goes.
SHUTDOWN_GRACE = 0.1


def read_uptime(proc: Path = Path("/proc")) -> float:
    """Seconds since the kernel booted (CLOCK_BOOTTIME); 0.0 where /proc is missing."""
    try:
        return float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


# The kernel logs this when it hands over to /init, at the end of its own boot.
INIT_HANDOVER_MESSAGE = "Run /init as init process"
MAX_KMSG_RECORDS = 10000


def read_process_start_uptime(proc: Path = Path("/proc")) -> float:
    """When the kernel started this process, in seconds since boot; 0.0 if unknown."""
    try:
        stat = (proc / "self/stat").read_text()
        # Fields after the parenthesised command name start at field 3; starttime is field 22.
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        return start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def read_init_handover_uptime(kmsg: Path = Path("/dev/kmsg")) -> float:
    """When the kernel ran /init, from its log records; 0.0 if the record is gone.

    PID 1 exists from the start of boot (as a kernel thread that later execs /init),
    so its own start time says nothing; the kernel's log does.
    """
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0.0
    try:
        for _ in range(MAX_KMSG_RECORDS):
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break  # no more records
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue  # records overwritten while reading: go on with the next
                break
            header, _, text = record.partition(";")
            if text.startswith(INIT_HANDOVER_MESSAGE):
                return int(header.split(",")[2]) / 1e6
    except (ValueError, IndexError):
        pass
    finally:
        os.close(fd)
    return 0.0


def read_init_started_uptime() -> float:
    """When the guest's init (this agent's process, or /init that exec'd it) started."""
    return read_init_handover_uptime() if os.getpid() == 1 else read_process_start_uptime()


def read_mem_total(proc: Path = Path("/proc")) -> int:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def count_cpu_list(text: str) -> int:
    """Count the CPUs in a kernel CPU list such as "0-3,6"."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


#: OnlineCpus waits at most this long for hot-added CPUs to appear, whatever the host asks
MAX_ONLINE_WAIT = 30.0
ONLINE_POLL = 0.1


async def online_cpus(wanted: int, timeout: float, sys_root: Path = Path("/sys")) -> int:
    """Write 1 to the ``online`` file of offline CPUs until ``wanted`` are online or ``timeout``
    (bounded by MAX_ONLINE_WAIT) passes; the CPUs online at the end."""
    cpus = sys_root / "devices/system/cpu"
    deadline = asyncio.get_running_loop().time() + min(max(timeout, 0.0), MAX_ONLINE_WAIT)
    while True:
        online = read_online_cpus(sys_root)
        if online >= wanted or asyncio.get_running_loop().time() >= deadline:
            return online
        for control in sorted(cpus.glob("cpu[0-9]*/online")):
            try:
                if control.read_text().strip() == "0":
                    control.write_text("1")
            except OSError:
                continue  # not ready yet (ACPI still adding it): the next round tries again
        if read_online_cpus(sys_root) < wanted:
            await asyncio.sleep(ONLINE_POLL)


def read_online_cpus(sys_root: Path = Path("/sys")) -> int:
    try:
        return count_cpu_list((sys_root / "devices/system/cpu/online").read_text())
    except (OSError, ValueError):
        return os.cpu_count() or 0


class AgentService:
    """Handlers of kabuto.agent.v1.AgentService; ``shutdown_requested`` is set by Shutdown."""

    def __init__(self, started_uptime: float) -> None:
        self.started_uptime = started_uptime
        self.serving_uptime = 0.0  # set by whoever opens the channel
        self.shutdown_requested = asyncio.Event()

    def methods(self) -> dict[str, Method]:
        return {
            "Check": unary_method(agent_pb2.CheckRequest, self.check),
            "GetGuestDetails": unary_method(agent_pb2.GuestDetailsRequest, self.get_guest_details),
            "Shutdown": unary_method(agent_pb2.ShutdownRequest, self.shutdown),
            "OnlineCpus": unary_method(agent_pb2.OnlineCpusRequest, self.online_cpus),
            "ReseedRandomDev": unary_method(agent_pb2.ReseedRandomDevRequest, self.reseed_random_dev),
            "SetGuestDateTime": unary_method(agent_pb2.SetGuestDateTimeRequest, self.set_guest_date_time),
        }

    async def reseed_random_dev(
        self, request: agent_pb2.ReseedRandomDevRequest
    ) -> agent_pb2.ReseedRandomDevResponse:
        try:
            freshen.reseed(request.data)
        except freshen.FreshenError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        except OSError as exc:
            raise RpcError(Code.INTERNAL, f"reseeding the guest RNG: {exc}") from None
        return agent_pb2.ReseedRandomDevResponse()

    async def set_guest_date_time(
        self, request: agent_pb2.SetGuestDateTimeRequest
    ) -> agent_pb2.SetGuestDateTimeResponse:
        try:
            freshen.set_wall_clock(request.sec, request.usec)
        except freshen.FreshenError as exc:
            raise RpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        except OSError as exc:
            raise RpcError(Code.INTERNAL, f"setting the guest clock: {exc}") from None
        return agent_pb2.SetGuestDateTimeResponse()

    async def online_cpus(self, request: agent_pb2.OnlineCpusRequest) -> agent_pb2.OnlineCpusResponse:
        online = await online_cpus(request.cpus, request.timeout_seconds)
        return agent_pb2.OnlineCpusResponse(online_cpus=online)

    async def check(self, request: agent_pb2.CheckRequest) -> agent_pb2.CheckResponse:
        return agent_pb2.CheckResponse(status=agent_pb2.CheckResponse.SERVING)

    async def get_guest_details(
        self, request: agent_pb2.GuestDetailsRequest
    ) -> agent_pb2.GuestDetailsResponse:
        uname = os.uname()
        return agent_pb2.GuestDetailsResponse(
            kernel_release=uname.release,
            kernel_version=uname.version,
            machine=uname.machine,
            mem_total_bytes=read_mem_total(),
            online_cpus=read_online_cpus(),
            agent_version=kabuto.__version__,
            init_started_uptime_seconds=read_init_started_uptime(),
            agent_started_uptime_seconds=self.started_uptime,
            agent_serving_uptime_seconds=self.serving_uptime,
            uptime_seconds=read_uptime(),
            is_init=os.getpid() == 1,
        )

    async def shutdown(self, request: agent_pb2.ShutdownRequest) -> agent_pb2.ShutdownResponse:
        asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, self.shutdown_requested.set)
        return agent_pb2.ShutdownResponse()
