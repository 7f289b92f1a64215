"""The guest's networking for real, without a VM: the agent runs on this host in network,
mount and UTS namespaces of its own (test_guest_containers' agent), lo comes up with it, and
the test makes the "NICs" there (dummy links with a given MAC) through nsenter, then checks
what UpdateInterface, UpdateRoutes and AddARPNeighbors did with ``ip -j``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import test_guest_containers as guest

from kabuto.agent.containers import ContainerClient

NSENTER = shutil.which("nsenter")
IP = shutil.which("ip")

pytestmark = [
    *guest.pytestmark,
    pytest.mark.skipif(NSENTER is None or IP is None, reason="needs nsenter and iproute2's ip"),
]
# the agent of test_guest_containers, one per module
agent_process = guest.agent_process
client = guest.client
rootfs = guest.rootfs
run = guest.run
sh = guest.sh


def in_agent_netns(agent_pid: int, *args: str) -> str:
    command = [NSENTER or "nsenter", f"--net=/proc/{agent_pid}/ns/net", IP or "ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout


def ip_json(agent_pid: int, *args: str) -> Any:
    return json.loads(in_agent_netns(agent_pid, "-j", *args) or "[]")


async def test_lo_is_up_from_the_start_and_a_container_reaches_127_0_0_1(
    client: ContainerClient, rootfs: Path, agent_process: tuple[subprocess.Popen[bytes], str]
) -> None:
    (lo,) = ip_json(agent_process[0].pid, "link", "show", "lo")
    assert "UP" in lo["flags"]
    connect = "for i in $(seq 50); do echo ping | nc 127.0.0.1 4242 && break; sleep 0.1; done"
    status, out, err = await run(client, sh(rootfs, f"nc -l -p 4242 & {connect}; wait"))
    assert (status, out) == (0, b"ping\n"), err
