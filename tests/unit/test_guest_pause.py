"""PauseContainer, ResumeContainer and UpdateContainer of the guest's ContainerService, over
real ttrpc from the host's ContainerClient, against a fake cgroup v2 directory.

The fake cgroup is a plain directory; a small "kernel" task mirrors cgroup.freeze into
cgroup.events (frozen 0/1) as the kernel does once every task has stopped, or never does
(a cgroup that cannot freeze). Containers are planted in the service as it records them;
only the one removal test has a real process (a ``sleep``) as the container's init.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kabuto.agent import AgentClient
from kabuto.agent.containers import ContainerCallError, ContainerClient
from kabuto.cli.main import cli
from kabuto.guest.containers import cgroups
from kabuto.guest.containers import service as service_module
from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.pipes import MessagePipe
from kabuto.guest.containers.processes import Process
from kabuto.guest.containers.service import Container, ContainerService
from kabuto.guest.containers.spec import ContainerSpec, parse_process
from kabuto.guest.containers.streams import OutputStream
from kabuto.protos import CONTAINER_SERVICE
from kabuto.runtime import commands
from kabuto.ttrpc import Code, Server

KERNEL_POLL = 0.005


class FakeKernel:
    """Reports a cgroup frozen (cgroup.events) some polls after cgroup.freeze asks for it."""

    def __init__(self, cgroup: Path, *, delay_polls: int = 3, can_freeze: bool = True) -> None:
        self.cgroup = cgroup
        self.delay_polls = delay_polls
        self.can_freeze = can_freeze
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        reported, pending_polls = "0", 0
        while True:
            wanted = (self.cgroup / "cgroup.freeze").read_text().strip()
            if wanted != reported and (wanted == "0" or self.can_freeze):
                pending_polls += 1
                if pending_polls > self.delay_polls:
                    reported, pending_polls = wanted, 0
                    (self.cgroup / "cgroup.events").write_text(f"populated 1\nfrozen {reported}\n")
            await asyncio.sleep(KERNEL_POLL)


def fake_cgroup(directory: Path, controllers: str = "cpu memory pids") -> Path:
    directory.mkdir(parents=True)
    (directory / "cgroup.controllers").write_text(controllers + "\n")
    (directory / "cgroup.freeze").write_text("0\n")
    (directory / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (directory / "memory.max").write_text("max\n")
    (directory / "pids.max").write_text("max\n")
    return directory


def plant(
    service: ContainerService,
    container_id: str,
    cgroup: Path | None,
    *,
    started: bool = True,
    exited: bool = False,
    pid: int = 0,
) -> Container:
    """A container as create_container records it (the init needs no real process)."""
    report_r, report_w = os.pipe()
    os.close(report_w)
    loop = asyncio.get_running_loop()
    init = Process(
        exec_id="",
        spec=parse_process({"args": ["sh"], "cwd": "/"}),
        monitor_pid=0,
        stdin=None,
        stdout=OutputStream(None),
        stderr=OutputStream(None),
        tty_fd=None,
        exit_status=loop.create_future(),
        report=MessagePipe(report_r),
        pid=pid,
    )
    if exited:
        init.exit_status.set_result(0)
    spec = ContainerSpec(
        root_path="/nonexistent", readonly_root=False, process=init.spec,
        namespaces=sc.CLONE_NEWNS | sc.CLONE_NEWPID,
    )
    container = Container(container_id, spec, init, None, "mnt:[0]", cgroup, None, started=started)
    service.containers[container_id] = container
    return container


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[tuple[ContainerService, ContainerClient]]:
    service = ContainerService(cgroup_root=tmp_path / "cgroup")
    server = Server()
    server.register(CONTAINER_SERVICE, service.methods())
    socket_path = tmp_path / "agent.sock"
    listener = await asyncio.start_unix_server(server.serve, path=str(socket_path))
    agent = await AgentClient.connect(f"unix://{socket_path}", 5.0, call_timeout=10.0)
    try:
        yield service, ContainerClient(agent)
    finally:
        for container in service.containers.values():
            container.init.close()
        await agent.close()
        listener.close()
        await listener.wait_closed()


@contextlib.asynccontextmanager
async def kernel(cgroup: Path, **options: Any) -> AsyncIterator[FakeKernel]:
    fake = FakeKernel(cgroup, **options)
    task = asyncio.create_task(fake.run())
    try:
        yield fake
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def events(cgroup: Path) -> str:
    return (cgroup / "cgroup.events").read_text()


async def test_pause_waits_for_frozen_and_resume_thaws(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path
) -> None:
    service, client = guest
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1")
    container = plant(service, "c1", cgroup)
    async with kernel(cgroup, delay_polls=5):
        await client.pause_container("c1")
        # answered only once the "kernel" reported every task frozen
        assert (cgroup / "cgroup.freeze").read_text() == "1"
        assert "frozen 1" in events(cgroup)
        assert container.status == "paused"
        await client.resume_container("c1")
        assert (cgroup / "cgroup.freeze").read_text() == "0"
        assert "frozen 0" in events(cgroup)
        assert container.status == "running"


async def test_pause_and_resume_refuse_the_wrong_state(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path
) -> None:
    service, client = guest
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1")
    plant(service, "c1", cgroup)
    plant(service, "created", fake_cgroup(tmp_path / "cgroup/kabuto/created"), started=False)
    plant(service, "stopped", fake_cgroup(tmp_path / "cgroup/kabuto/stopped"), exited=True)
    async with kernel(cgroup):
        with pytest.raises(ContainerCallError, match="it is running, not paused") as info:
            await client.resume_container("c1")
        assert info.value.code == Code.FAILED_PRECONDITION
        await client.pause_container("c1")
        with pytest.raises(ContainerCallError, match="it is paused, not running") as info:
            await client.pause_container("c1")
        assert info.value.code == Code.FAILED_PRECONDITION
    for container_id, status in (("created", "created"), ("stopped", "stopped")):
        with pytest.raises(ContainerCallError, match=f"it is {status}, not running") as info:
            await client.pause_container(container_id)
        assert info.value.code == Code.FAILED_PRECONDITION
        assert (tmp_path / f"cgroup/kabuto/{container_id}/cgroup.freeze").read_text().strip() == "0"


async def test_a_cgroup_that_does_not_freeze_is_thawed_again(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client = guest
    monkeypatch.setattr(cgroups, "FREEZE_TIMEOUT", 0.3)
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1")
    container = plant(service, "c1", cgroup)
    async with kernel(cgroup, can_freeze=False):
        with pytest.raises(ContainerCallError, match=r"did not report frozen 1 within 0\.3s") as info:
            await client.pause_container("c1")
    assert info.value.code == Code.UNAVAILABLE
    assert (cgroup / "cgroup.freeze").read_text() == "0"
    assert container.status == "running"


async def test_unknown_container_and_no_cgroup(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path
) -> None:
    service, client = guest
    plant(service, "bare", None)
    calls = (
        client.pause_container,
        client.resume_container,
        lambda container_id: client.update_container(container_id, {"pids": {"limit": 10}}),
    )
    for call in calls:
        with pytest.raises(ContainerCallError, match="'ghost' does not exist") as info:
            await call("ghost")
        assert info.value.code == Code.NOT_FOUND
    for call in (calls[0], calls[2]):
        with pytest.raises(ContainerCallError, match="has no cgroup") as info:
            await call("bare")
        assert info.value.code == Code.FAILED_PRECONDITION
    with pytest.raises(ContainerCallError) as info:
        await client.pause_container("../escape")
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_update_writes_the_create_time_mapping(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path
) -> None:
    service, client = guest
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1")
    plant(service, "c1", cgroup)
    await client.update_container("c1", {
        "memory": {"limit": 64 << 20},
        "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
        "pids": {"limit": 42},
        "devices": [{"allow": False, "access": "rwm"}],
    })
    assert (cgroup / "memory.max").read_text() == str(64 << 20)
    assert (cgroup / "cpu.max").read_text() == "50000 100000"
    assert (cgroup / "cpu.weight").read_text() == "39"  # runc's shares -> weight conversion
    assert (cgroup / "pids.max").read_text() == "42"
    # a limit left out stays; -1 lifts one, as runc update does
    await client.update_container("c1", json.dumps({"memory": {"limit": -1}}).encode())
    assert (cgroup / "memory.max").read_text() == "max"
    assert (cgroup / "pids.max").read_text() == "42"
    await client.update_container("c1", {"pids": {"limit": -1}})
    assert (cgroup / "pids.max").read_text() == "max"


async def test_update_refusals(guest: tuple[ContainerService, ContainerClient], tmp_path: Path) -> None:
    service, client = guest
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1", controllers="memory pids")
    plant(service, "c1", cgroup)
    plant(service, "stopped", fake_cgroup(tmp_path / "cgroup/kabuto/stopped"), exited=True)
    for resources, message in (
        (b"{not json", "invalid JSON"),
        (b"[1]", "must be an object"),
        ({"cpu": {"cpus": "0"}}, "needs the cpuset cgroup controller"),
        ({"blockIO": {"weight": 10}}, "blockIO is not supported"),
        ({"memory": {"limit": "lots"}}, "memory.limit"),
        (b" " * (service_module.MAX_SPEC_BYTES + 1), "more than"),
    ):
        with pytest.raises(ContainerCallError, match=message) as info:
            await client.update_container("c1", resources)
        assert info.value.code == Code.INVALID_ARGUMENT
    assert (cgroup / "memory.max").read_text() == "max\n"
    with pytest.raises(ContainerCallError, match="it is stopped") as info:
        await client.update_container("stopped", {"pids": {"limit": 10}})
    assert info.value.code == Code.FAILED_PRECONDITION


async def test_removing_a_paused_container_thaws_and_kills_it(
    guest: tuple[ContainerService, ContainerClient], tmp_path: Path
) -> None:
    service, client = guest
    cgroup = fake_cgroup(tmp_path / "cgroup/kabuto/c1")
    sleeper = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        container = plant(service, "c1", cgroup, pid=sleeper.pid)

        async def report_exit() -> None:  # the monitor's part: the init's wait status
            container.init.exit_status.set_result(await sleeper.wait())

        reporter = asyncio.create_task(report_exit())
        async with kernel(cgroup):
            await client.pause_container("c1")
            await client.remove_container("c1")
        await reporter
        assert sleeper.returncode == -signal.SIGKILL
        assert (cgroup / "cgroup.freeze").read_text() == "0"
        assert "c1" not in service.containers
    finally:
        if sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()


def test_update_command_line_checks_its_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    root = ["--root", str(tmp_path)]
    for args, message in (
        (["update", *root, "c1"], "nothing to update"),
        (["update", *root, "-r", "-", "--memory", "64m", "c1"], "not both"),
        (["update", *root, "--memory", "lots", "c1"], "is not a size"),
        (["update", *root, "-r", str(tmp_path / "missing.json"), "c1"], "cannot read"),
        (["update", *root, "-r", "-", "c1"], "not JSON"),
    ):
        result = runner.invoke(cli, args, input="{oops")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
    asked: list[tuple[str, dict[str, Any]]] = []

    async def update(container_id: str, resources: dict[str, Any], options: Any) -> None:
        asked.append((container_id, resources))

    monkeypatch.setattr(commands, "update", update)
    limits = ["--memory", "64m", "--cpu-quota", "-1", "--pids-limit", "10"]
    result = runner.invoke(cli, ["update", *root, *limits, "c1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["update", *root, "-r", "-", "c2"], input='{"memory": {"limit": 1024}}')
    assert result.exit_code == 0, result.output
    assert asked == [
        ("c1", {"memory": {"limit": 64 << 20}, "cpu": {"quota": -1}, "pids": {"limit": 10}}),
        ("c2", {"memory": {"limit": 1024}}),
    ]
