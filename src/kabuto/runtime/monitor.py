"""The host process that stands for a container's process, as runc's container init does.

runc's caller (conmon, containerd's runc shim, a shell) treats the container's init as an
ordinary child: its pid is in ``--pid-file`` and ``state``, it holds the container's stdio, a
signal sent to it reaches the container, and its exit status is the container's. Here the
process runs in the guest, so ``kabuto create`` (and ``kabuto exec --detach``) leaves this small
process behind instead, as Kata 1.x left kata-shim:

* a child of the ``create`` caller (so a subreaper such as conmon reaps it), in a session of
  its own (a Ctrl-C meant for the caller's shell does not reach it);
* its stdin, stdout and stderr are the ones ``create`` was given: it copies its stdin to the
  process's, and the process's stdout and stderr to its own, until end of file;
* with ``--console-fd`` (``--console-socket``, a process with a terminal) it makes a pty, sends
  the master over the socket with SCM_RIGHTS as runc does, and uses the slave as its stdio
  (raw: the guest's own pty does the line discipline) and controlling terminal, so the
  caller's window size changes arrive as SIGWINCH and resize the guest's terminal;
* the signals it can catch are forwarded to the process (SIGKILL and SIGSTOP cannot be);
* it exits with the process's exit status (128+N when signal N killed it); 137 when the VM
  went away (the container was killed with it).

    python -m kabuto.runtime.monitor --ready-fd FD --container ID [--exec-id ID]
        [--console-fd FD] --agent ADDRESS [--agent ...]

It writes ``1`` to ``--ready-fd`` once it holds its agent connection (and sent the pty master),
so the caller returns only when no output can be missed, or ``E`` and the reason.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from collections.abc import AsyncIterator

from kabuto.agent.client import AgentClient, wait_for_agent
from kabuto.agent.containers import MAX_CHUNK, ContainerClient
from kabuto.errors import KabutoError

CONNECT_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0
# After the process exits, its remaining output drains within this bound.
OUTPUT_DRAIN_TIMEOUT = 30.0
READY = b"1"
FAILED = b"E"
# the status a caller sees when the VM (and so the container) went away under it
VM_GONE_STATUS = 128 + signal.SIGKILL
STDIN_CHUNK = 64 * 1024
STDIN_QUEUE_CHUNKS = 16
# the name runc sends with the master (containerd/console names its master /dev/ptmx)
CONSOLE_NAME = b"/dev/ptmx"
# caught and forwarded; the rest keep their default (SIGCHLD, SIGWINCH, faults, SIGPIPE)
FORWARDED_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
    signal.SIGTERM, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGURG,
    signal.SIGXCPU, signal.SIGXFSZ, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR,
)


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


async def copy_stream(containers: ContainerClient, container_id: str, stream: str, fd: int,
                      exec_id: str = "") -> None:
    read = containers.read_stdout if stream == "stdout" else containers.read_stderr
    writable = True
    # each read is a bounded long poll; a dead VM or channel fails the next one
    while chunk := await read(container_id, exec_id, MAX_CHUNK):
        if writable:
            writable = await _write_all(fd, chunk)


async def _chunks(fd: int) -> AsyncIterator[bytes]:
    """What ``fd`` reads, by a daemon thread (a blocked read cannot be cancelled; /dev/null and
    files cannot be polled), through a bounded queue; a pty whose master closed ends it (EIO)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(STDIN_QUEUE_CHUNKS)

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, STDIN_CHUNK)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except (RuntimeError, asyncio.CancelledError):
                return
            if not data:
                return

    threading.Thread(target=reader, name="kabuto-monitor-stdin", daemon=True).start()
    while data := await queue.get():
        yield data


async def feed_stdin(containers: ContainerClient, container_id: str, exec_id: str, fd: int) -> None:
    # a process that exited (or closed its stdin) takes no more input: the rest is dropped
    with contextlib.suppress(KabutoError):
        async for data in _chunks(fd):
            await containers.write_stdin(container_id, exec_id, data)
        await containers.close_stdin(container_id, exec_id)


def send_console(console: socket.socket) -> int:
    """Make a pty, send its master over ``console`` as runc does, return the slave (raw)."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        console.sendmsg([CONSOLE_NAME], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))])
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def take_terminal(slave: int) -> None:
    """The slave becomes stdio and controlling terminal (this process leads its own session)."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def _window_size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


async def monitor(container_id: str, exec_id: str, addresses: list[str], terminal: bool,
                  ready: asyncio.Future[None]) -> int:
    """Connect, report ready, stream and forward until the process exits; its exit status."""
    agent: AgentClient | None = None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coroutine: object) -> None:
        task = loop.create_task(coroutine)  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        agent = await wait_for_agent(addresses, CONNECT_TIMEOUT, call_timeout=CALL_TIMEOUT)
        containers = ContainerClient(agent)
        ready.set_result(None)

        async def forward(number: int) -> None:
            # a process that has not started or has just exited cannot be signalled: no one to tell
            with contextlib.suppress(KabutoError):
                await containers.signal_process(container_id, exec_id, number)

        async def resize() -> None:
            with contextlib.suppress(KabutoError, OSError):
                await containers.tty_win_resize(container_id, exec_id, *_window_size(0))

        for number in FORWARDED_SIGNALS:
            loop.add_signal_handler(number, lambda n=int(number): spawn(forward(n)))
        if terminal:
            loop.add_signal_handler(signal.SIGWINCH, lambda: spawn(resize()))
            spawn(resize())
        streams = [asyncio.create_task(copy_stream(containers, container_id, "stdout", 1, exec_id))]
        if not terminal:
            streams.append(asyncio.create_task(copy_stream(containers, container_id, "stderr", 2, exec_id)))
        spawn(feed_stdin(containers, container_id, exec_id, 0))
        status = await containers.wait_process(container_id, exec_id)
        with contextlib.suppress(TimeoutError, KabutoError):
            async with asyncio.timeout(OUTPUT_DRAIN_TIMEOUT):
                await asyncio.gather(*streams)
        return status & 0xFF
    except (KabutoError, OSError) as exc:
        if not ready.done():
            ready.set_exception(exc)
            return 1
        # the VM went away or the container was deleted: it was killed with it
        return VM_GONE_STATUS
    finally:
        for task in list(tasks):
            task.cancel()
        if agent is not None:
            with contextlib.suppress(KabutoError, OSError):
                await agent.close()


async def _main(args: argparse.Namespace) -> int:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    terminal = args.console_fd is not None
    try:
        if terminal:
            with socket.socket(fileno=args.console_fd) as console:
                take_terminal(send_console(console))
    except OSError as exc:
        os.write(args.ready_fd, FAILED + f"cannot send the console to its socket: {exc}".encode())
        return 1
    task = asyncio.create_task(monitor(args.container, args.exec_id, args.agent, terminal, ready))
    try:
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is None:
            os.write(args.ready_fd, READY)
        else:
            reason = ready.exception() if ready.done() else "it ended before reaching the agent"
            os.write(args.ready_fd, FAILED + str(reason).encode())
    finally:
        os.close(args.ready_fd)
    return await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kabuto-monitor", description=__doc__.splitlines()[0])
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--exec-id", default="")
    parser.add_argument("--console-fd", type=int, default=None)
    parser.add_argument("--agent", action="append", required=True)
    args = parser.parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
