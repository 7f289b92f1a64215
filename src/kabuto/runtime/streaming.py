"""One process's stdio streamed between the host and the guest agent until it exits: output to
sinks, input from an iterator, signals and window changes forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from kabuto.errors import KabutoError
from kabuto.runtime.sandbox import VirtSandbox

# After the process exits, its remaining output drains within this bound.
OUTPUT_DRAIN_TIMEOUT = 30.0


Sink = Callable[[bytes], Awaitable[None]]


@dataclass
class ProcessIO:
    """Where a process's output goes and where its input comes from (None: /dev/null)."""

    stdout: Sink | None = None
    stderr: Sink | None = None
    stdin: AsyncIterator[bytes] | None = None
    #: (rows, cols) of the local terminal, for a process with a terminal (sent again on SIGWINCH)
    terminal_size: Callable[[], tuple[int, int]] | None = None


# -- exec / run --------------------------------------------------------------------------------
async def run_process(sandbox: VirtSandbox, container_id: str, exec_id: str, io: ProcessIO,
                      on_signal: Callable[[Callable[[int], None]], None] | None = None) -> int:
    """Stream one process's stdio until it exits; return its exit status (128+N for signal N).

    ``on_signal`` receives a function that forwards a signal number to the process.
    """
    loop = asyncio.get_running_loop()
    forwarded: set[asyncio.Task[None]] = set()

    def forward(number: int) -> None:
        if number == signal.SIGWINCH:
            # a window change resizes the container's terminal, as runc does; never a signal
            if io.terminal_size is None:
                return
            rows, cols = io.terminal_size()
            task = loop.create_task(_resize_quietly(sandbox, container_id, exec_id, rows, cols))
        else:
            task = loop.create_task(_signal_quietly(sandbox, container_id, exec_id, number))
        forwarded.add(task)
        task.add_done_callback(forwarded.discard)

    if on_signal is not None:
        on_signal(forward)
    if io.terminal_size is not None:
        forward(signal.SIGWINCH)

    async def pump(stream: str, sink: Sink | None) -> None:
        while chunk := await sandbox.read_output(container_id, exec_id, stream):
            if sink is not None:
                await sink(chunk)

    async def feed() -> None:
        if io.stdin is not None:
            async for data in io.stdin:
                await sandbox.write_stdin(container_id, exec_id, data)
        await sandbox.close_stdin(container_id, exec_id)

    pumps = [asyncio.create_task(pump("stdout", io.stdout)), asyncio.create_task(pump("stderr", io.stderr))]
    feeder = asyncio.create_task(feed())
    waiter = asyncio.create_task(sandbox.wait_process(container_id, exec_id))
    try:
        await asyncio.wait({waiter, *pumps}, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in pumps if t.done() and t.exception() is not None), None)
        if failed is not None and not waiter.done():
            # a sink that gave up (a capture bound reached, a reader gone wrong) ends the process:
            # otherwise it would block on a full pipe and this wait would never end
            await _signal_quietly(sandbox, container_id, exec_id, signal.SIGKILL)
            raise failed.exception()  # type: ignore[misc]
        status = await waiter
        assert status is not None
        async with asyncio.timeout(OUTPUT_DRAIN_TIMEOUT):
            await asyncio.gather(*pumps)
        return status
    finally:
        for task in (*pumps, feeder, waiter, *forwarded):
            task.cancel()
        await asyncio.gather(*pumps, feeder, waiter, *forwarded, return_exceptions=True)


async def _signal_quietly(sandbox: VirtSandbox, container_id: str, exec_id: str, number: int) -> None:
    # a process that just exited cannot be signalled: nothing to report
    with contextlib.suppress(KabutoError):
        await sandbox.kill(container_id, number, exec_id=exec_id)


async def _resize_quietly(sandbox: VirtSandbox, container_id: str, exec_id: str, rows: int,
                          cols: int) -> None:
    with contextlib.suppress(KabutoError):
        await sandbox.resize_terminal(container_id, exec_id, rows, cols)
