"""The output pump of a detached container (``kabuto create`` + ``start``).

runc's container process keeps the stdio ``runc create`` was given, so its output goes where
create's stdout and stderr pointed, even after runc exited. Here the process runs in the guest,
so ``create`` leaves this small process behind instead: in a session of its own, stdin from
/dev/null, stdout and stderr inherited from the ``create`` caller. It claims one agent port,
copies the container's first process's stdout and stderr to its own until end of file (the
process exited), then exits. ``delete`` ends it if it is still there; a VM that dies closes its
agent connection, which ends it too.

    python -m kabuto.runtime.iopump --ready-fd FD --container ID --agent ADDRESS [--agent ...]

It writes one byte to ``--ready-fd`` once it holds its agent connection, so ``create`` returns
only when no output can be missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys

from kabuto.agent.client import AgentClient, wait_for_agent
from kabuto.agent.containers import MAX_CHUNK, ContainerClient
from kabuto.errors import KabutoError

CONNECT_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0
READY = b"1"


async def _write_all(fd: int, data: bytes) -> bool:
    """Write ``data`` to ``fd``; False once the reader is gone (then the rest is discarded, so
    the container is never blocked by a closed terminal or pipe)."""
    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    try:
        await asyncio.get_running_loop().run_in_executor(None, write)
    except OSError:
        return False
    return True


async def copy_stream(containers: ContainerClient, container_id: str, stream: str, fd: int) -> None:
    read = containers.read_stdout if stream == "stdout" else containers.read_stderr
    writable = True
    # each read is a bounded long poll; a dead VM or channel fails the next one
    while chunk := await read(container_id, "", MAX_CHUNK):
        if writable:
            writable = await _write_all(fd, chunk)


async def pump(container_id: str, addresses: list[str], ready_fd: int) -> int:
    agent: AgentClient | None = None
    try:
        agent = await wait_for_agent(addresses, CONNECT_TIMEOUT, call_timeout=CALL_TIMEOUT)
        os.write(ready_fd, READY)
        os.close(ready_fd)
        containers = ContainerClient(agent)
        await asyncio.gather(copy_stream(containers, container_id, "stdout", 1),
                             copy_stream(containers, container_id, "stderr", 2))
        return 0
    except (KabutoError, OSError):
        # the VM went away or the container was deleted: nobody is left to tell
        return 1
    finally:
        if agent is not None:
            with contextlib.suppress(KabutoError, OSError):
                await agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kabuto-iopump", description=__doc__.splitlines()[0])
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--agent", action="append", required=True)
    args = parser.parse_args(argv)
    return asyncio.run(pump(args.container, args.agent, args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
