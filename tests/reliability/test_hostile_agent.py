"""A hostile guest agent (hostile_agent.py) against the host's real agent client (kabuto.agent:
wait_for_agent, AgentClient, ContainerClient) and the runtime's stream pump (run_process, with the
Python API's capture bound) over a unix socket, the channel kind of QEMU's agent port.

Each misdeed is checked for three things: the host's memory stays bounded (tracemalloc's peak), the
wait ends at its configured time (measured), and the host's event loop never blocks (a ticker task
must keep running throughout). tests/unit/test_ttrpc_robustness.py covers the framing layer alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hostile_agent import Action, HostileAgent, answer, oversized_header, status
from reliability_support import Figures, LoopWatch, scale

from kabuto import api
from kabuto.agent.client import wait_for_agent
from kabuto.agent.containers import MAX_CHUNK, ContainerClient
from kabuto.config.model import KabutoConfig
from kabuto.errors import AgentError, KabutoError
from kabuto.hypervisor.capabilities import Capabilities
from kabuto.protos import containers_pb2 as pb
from kabuto.protos import ttrpc_pb2
from kabuto.runtime import streaming
from kabuto.runtime.sandbox import VMM_EXIT_GRACE, VirtSandbox
from kabuto.runtime.state import ContainerRecord, SandboxRecord, StateStore
from kabuto.ttrpc import Code

CALL_TIMEOUT = 1.0
# how late a bounded wait may end: scheduling on a loaded 2-core machine
LATENESS = 1.0
# what the host may allocate while one misdeed lasts, beyond what it was told to keep
MEMORY_BOUND = 16 << 20


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kbh-", dir="/tmp") as directory:
        yield Path(directory) / "agent.sock"


@contextlib.asynccontextmanager
async def hostile(socket_path: Path, behaviour: object, figures: Figures, *,
                  keeps: int = 0) -> AsyncIterator[ContainerClient]:
    """A ContainerClient connected to a hostile agent, memory traced and the loop watched; the
    figures get the peak and the longest stall. ``keeps``: what the test's sink is allowed to keep
    (a bytearray: CPython grows one by an eighth beyond what it holds)."""
    async with HostileAgent(socket_path, behaviour) as agent:  # type: ignore[arg-type]
        client = await wait_for_agent(agent.address, 10, call_timeout=CALL_TIMEOUT)
        tracemalloc.start()
        try:
            with LoopWatch() as watch:
                yield ContainerClient(client, poll_interval=CALL_TIMEOUT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            await client.close()
        figures["traced_peak_mib"] = round(peak / 2**20, 2)
        figures["longest_loop_stall_seconds"] = round(watch.longest_gap, 3)
        assert peak < MEMORY_BOUND + keeps * 9 // 8, f"traced peak {peak / 2**20:.1f} MiB"
        assert watch.longest_gap < LATENESS, f"the host's loop stalled {watch.longest_gap:.2f}s"


def timed(figures: Figures, limit: float) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def measure() -> Iterator[None]:
        started = time.monotonic()
        yield
        elapsed = time.monotonic() - started
        figures["wait_seconds"] = round(elapsed, 2)
        figures["configured_seconds"] = limit
        assert elapsed < limit + LATENESS, f"the wait took {elapsed:.2f}s, configured {limit:g}s"
    return measure()


# -- misdeeds on one call ----------------------------------------------------------------------
async def test_oversized_frame_breaks_the_connection_without_allocating(socket_path: Path,
                                                                        figures: Figures) -> None:
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        return [oversized_header(stream)]

    async with hostile(socket_path, behaviour, figures) as client:
        with timed(figures, 0.0), pytest.raises(AgentError, match="over the 4194304-byte limit"):
            await client.read_stdout("c")
        assert client.agent.closed
        with pytest.raises(AgentError, match="over the 4194304-byte limit"):  # later calls say why too
            await client.wait_process("c", timeout=1)


async def test_unknown_stream_ids_are_dropped_and_the_call_ends_at_its_deadline(
        socket_path: Path, figures: Figures) -> None:
    floods = scale(20_000, 500_000)

    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> Iterator[Action]:
        for _ in range(floods // 1000):  # made as sent: 500 000 frames take seconds to encode
            yield b"".join(answer(stream + 2 * (i + 1), pb.WaitProcessResponse()) for i in range(1000))
        yield answer(stream + 2, pb.WaitProcessResponse(exit_status=0))

    async with hostile(socket_path, behaviour, figures) as client:
        with timed(figures, CALL_TIMEOUT), pytest.raises(AgentError, match="no answer within"):
            await client.agent.call("GetGuestDetails", pb.WaitProcessRequest(), pb.WaitProcessResponse)
        figures["stray_responses"] = floods
        assert not client.agent.closed


async def test_garbage_protobuf_fails_the_call_with_an_agent_error(socket_path: Path,
                                                                   figures: Figures) -> None:
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        if method == "ExecProcess":  # a Response whose payload is no ExecProcessResponse
            return [answer(stream, b"\xff\xff\xff\xff\x0f")]
        return [answer(stream, b"")]

    async with hostile(socket_path, behaviour, figures) as client:
        with timed(figures, 0.0), pytest.raises(AgentError, match="ExecProcess failed"):
            await client.exec_process("c", "e", {"args": ["true"]})
        await client.close_stdin("c", "e")  # the connection still serves the next call


async def test_more_output_than_asked_is_refused(socket_path: Path, figures: Figures) -> None:
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        return [answer(stream, pb.ReadStreamResponse(data=b"x" * (MAX_CHUNK + 1)))]

    async with hostile(socket_path, behaviour, figures) as client:
        with pytest.raises(AgentError, match=f"ReadStdout sent {MAX_CHUNK + 1} bytes, asked {MAX_CHUNK}"):
            await client.read_stdout("c")


async def test_never_answering_ends_every_wait_at_its_time(socket_path: Path, figures: Figures) -> None:
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        return []

    async with hostile(socket_path, behaviour, figures) as client:
        with timed(figures, CALL_TIMEOUT), pytest.raises(AgentError, match="no answer within"):
            await client.exec_process("c", "e", {"args": ["true"]})
        with timed(figures, 2.5), pytest.raises(AgentError, match=r"no answer within 2\.5s"):
            await client.wait_process("c", "e", timeout=2.5)


async def test_an_answer_after_the_deadline_is_dropped(socket_path: Path, figures: Figures) -> None:
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        if method == "ExecProcess":
            return [CALL_TIMEOUT + 0.5, answer(stream, pb.ExecProcessResponse(pid=7))]
        return [answer(stream, pb.ListProcessesResponse(pids=[1, 2]))]

    async with hostile(socket_path, behaviour, figures) as client:
        with timed(figures, CALL_TIMEOUT), pytest.raises(AgentError, match="no answer within"):
            await client.exec_process("c", "e", {"args": ["true"]})
        await asyncio.sleep(1.0)  # the late answer arrives meanwhile, for a stream nobody waits on
        assert await client.list_processes("c") == [1, 2]


async def test_instant_deadline_answers_do_not_spin_the_host(socket_path: Path, figures: Figures) -> None:
    """A guest answering every long poll with DEADLINE_EXCEEDED at once (a real one waits the
    poll out): the wait ends at its time and the host polls at a bounded rate."""
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        return [status(stream, Code.DEADLINE_EXCEEDED, "nothing yet")]

    async with HostileAgent(socket_path, behaviour) as agent:
        client = ContainerClient(await wait_for_agent(agent.address, 10, call_timeout=CALL_TIMEOUT),
                                 poll_interval=CALL_TIMEOUT)
        try:
            with timed(figures, 2.0), pytest.raises(AgentError, match="no answer within 2s"):
                await client.wait_process("c", timeout=2.0)
        finally:
            await client.agent.close()
        polls = agent.calls.count("WaitProcess")
    figures["polls_in_2_seconds"] = polls
    assert polls <= 2.0 / ContainerClient.MIN_POLL_SECONDS + 2, polls


# -- the runtime's pump under an endless stream ------------------------------------------------
class AliveVmm:
    """The hypervisor as the stream pump sees it: a VMM that keeps running."""

    name = "hostile"
    devices: list[object] = []

    async def get_pids(self) -> list[int]:
        return [1]

    def exit_reason(self) -> str:
        return ""


def sandbox_on(client: ContainerClient, tmp_path: Path) -> VirtSandbox:
    record = SandboxRecord(id="c", hypervisor_name="hostile", config_path=None, status="ready",
                           containers={"c": ContainerRecord(id="c", bundle="", status="running")})
    sandbox = VirtSandbox(record, StateStore(tmp_path), AliveVmm(), KabutoConfig(),  # type: ignore[arg-type]
                          Capabilities())
    sandbox.agent, sandbox._containers = client.agent, client
    return sandbox


async def test_endless_output_stops_at_the_capture_bound_and_the_process_is_killed(
        socket_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, figures: Figures) -> None:
    bound = scale(16 << 20, 256 << 20)
    monkeypatch.setattr(api, "MAX_CAPTURE_BYTES", bound)
    chunk = pb.ReadStreamResponse(data=b"y" * MAX_CHUNK)
    signalled: list[int] = []

    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        if method == "SignalProcess":
            signalled.append(pb.SignalProcessRequest.FromString(request.payload).signal)
            return [answer(stream, pb.SignalProcessResponse())]
        if method == "ReadStdout":
            return [answer(stream, chunk)]
        if method == "WaitProcess":
            return [CALL_TIMEOUT * 0.9, status(stream, Code.DEADLINE_EXCEEDED)]  # never exits
        return [CALL_TIMEOUT * 0.9, status(stream, Code.DEADLINE_EXCEEDED)]

    out = bytearray()
    async with hostile(socket_path, behaviour, figures, keeps=bound) as client:
        io = streaming.ProcessIO(stdout=api._collector(out, "stdout", ["yes"]))
        started = time.monotonic()
        with pytest.raises(KabutoError, match=f"stdout of 'yes' exceeds {bound} bytes"):
            await asyncio.wait_for(streaming.run_process(sandbox_on(client, tmp_path), "c", "", io), 120)
        figures["seconds_to_bound"] = round(time.monotonic() - started, 2)
    figures["kept_bytes"] = len(out)
    assert len(out) <= bound and signalled == [9]


async def test_a_dead_channel_ends_the_pump_with_the_reason(socket_path: Path, tmp_path: Path,
                                                           figures: Figures) -> None:
    """The agent's connection closes mid-stream while the VMM still runs: the pump ends at once
    with the channel's error, not a hang."""
    def behaviour(stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        return [0.2, oversized_header(stream)]

    async with hostile(socket_path, behaviour, figures) as client:
        # the VMM "runs": the runtime gives it VMM_EXIT_GRACE to be seen gone, then reports the channel
        with timed(figures, 0.2 + VMM_EXIT_GRACE), \
                pytest.raises(AgentError, match="over the 4194304-byte limit"):
            await streaming.run_process(sandbox_on(client, tmp_path), "c", "", streaming.ProcessIO())
