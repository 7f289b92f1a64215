"""A hostile guest agent for a VM of the shipped image: tests/reliability/test_hostile_guest.py
appends an initramfs archive to the shipped initrd that puts this file in place of the agent's
entry point (``kabuto/guest/__main__.py``, which /init execs as PID 1). The kernel, /init and the
virtio-serial channel are the real ones; only the answers are hostile.

It serves every agent port with hostile_agent.HostileAgent: Check as SERVING, the sandbox's
set-up calls with empty answers (a valid message of any type), a container's init as running
for ever, and each exec by what its first argument names (MISDEEDS). A sandbox whose id starts
with ``silent`` never gets an answer to CreateSandbox.
"""

from __future__ import annotations

import asyncio
import json
import sys

from hostile_agent import Action, HostileAgent, answer, oversized_header, status

from kabuto.guest import channel
from kabuto.protos import containers_pb2 as pb
from kabuto.protos import ttrpc_pb2
from kabuto.ttrpc import Code

# how many answers the flood sends for streams the host never opened
FLOOD = 20_000
# what each exec's first argument makes of it
MISDEEDS = {
    "endless": "ReadStdout answers every read in full, for ever; the process never exits unless killed",
    "overread": "ReadStdout answers with one byte more than asked",
    "silent": "ExecProcess is never answered",
    "late": "ExecProcess is answered a second after the caller's deadline",
    "flood": f"{FLOOD} answers on streams the host never opens, and none on the caller's",
    "garbage": "ExecProcess is answered with bytes that are no ExecProcessResponse",
    "huge-frame": "ExecProcess is answered with a header announcing ~4 GiB",
}


class Guest:
    def __init__(self) -> None:
        self.misdeeds: dict[str, str] = {}  # exec id -> its first argument
        self.killed: set[str] = set()

    def behave(self, stream: int, method: str, request: ttrpc_pb2.Request) -> list[Action]:
        seconds = request.timeout_nano / 1e9 if request.timeout_nano > 0 else 30.0
        if method == "CreateSandbox":
            sandbox = pb.CreateSandboxRequest.FromString(request.payload).sandbox_id
            return [] if sandbox.startswith("silent") else [answer(stream, b"")]
        if method == "ExecProcess":
            return self.exec_process(stream, seconds, pb.ExecProcessRequest.FromString(request.payload))
        if method in ("ReadStdout", "ReadStderr"):
            read = pb.ReadStreamRequest.FromString(request.payload)
            what = self.misdeeds.get(read.exec_id)
            if method == "ReadStdout" and what == "endless" and read.exec_id not in self.killed:
                return [answer(stream, pb.ReadStreamResponse(data=b"y" * read.max_len))]
            if method == "ReadStdout" and what == "overread":
                return [answer(stream, pb.ReadStreamResponse(data=b"x" * (read.max_len + 1)))]
            return [answer(stream, pb.ReadStreamResponse())]  # end of file
        if method == "WaitProcess":
            wait = pb.WaitProcessRequest.FromString(request.payload)
            running = wait.exec_id not in self.misdeeds or self.misdeeds[wait.exec_id] == "endless"
            if running and wait.exec_id not in self.killed:  # a long poll that ends with nothing
                return [max(seconds - 0.5, 0.0), status(stream, Code.DEADLINE_EXCEEDED, "still running")]
            code = 137 if wait.exec_id in self.killed else 0
            return [answer(stream, pb.WaitProcessResponse(exit_status=code))]
        if method == "SignalProcess":
            signal = pb.SignalProcessRequest.FromString(request.payload)
            if signal.signal == 9:
                self.killed.add(signal.exec_id)
        return [answer(stream, b"")]

    def exec_process(self, stream: int, seconds: float, request: pb.ExecProcessRequest) -> list[Action]:
        what = str((json.loads(request.process_json).get("args") or [""])[0])
        self.misdeeds[request.exec_id] = what
        done = answer(stream, pb.ExecProcessResponse(pid=7))
        if what == "silent":
            return []
        if what == "late":
            return [seconds + 1.0, done]
        if what == "flood":
            # even ids, which no call of the host's ever has: over a TCG guest's slow channel, odd
            # ones would still be arriving when the host's next calls take those ids, and would
            # answer them (as a guest may: nothing on the wire tells such an answer apart)
            return [b"".join(answer(stream + 1 + 2 * (i + 1000 * n), pb.WaitProcessResponse())
                             for i in range(1000)) for n in range(FLOOD // 1000)]
        if what == "garbage":
            return [answer(stream, b"\xff\xff\xff\xff\x0f")]
        if what == "huge-frame":
            return [oversized_header(stream)]
        return [done]


async def main() -> None:
    found = await channel.wait_for_channels(channel.DEFAULT_PORT_NAME, "off", 30.0)
    agent = HostileAgent(None, Guest().behave)
    print("kabuto-hostile-agent: serving", ", ".join(found.ports), file=sys.stderr, flush=True)
    async with asyncio.TaskGroup() as group:
        for path in found.ports.values():
            group.create_task(channel.VirtioSerialChannel.open(path).serve_forever(agent.serve))


if __name__ == "__main__":
    asyncio.run(main())
