"""``python3 -m kabuto.guest.probe``: call the agent from inside its own guest over AF_VSOCK.

The image's /init starts this beside the agent when the kernel command line says
``kabuto_vsock_probe=1``. It connects to the loopback transport's CID 1 at the agent's vsock
port, the listener a host reaches through a vsock device, retrying until the agent listens
(bounded), calls Check and GetGuestDetails over ttrpc, and prints one line to the console:
``KABUTO-VSOCK-OK ...`` or ``KABUTO-VSOCK-FAILED <why>``. Where the host has no vhost-vsock,
this is how a real guest's vsock listener is tested (tests/integration/test_guest_vsock.py).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from kabuto.guest import channel
from kabuto.protos import AGENT_SERVICE, agent_pb2
from kabuto.ttrpc import Client

# VMADDR_CID_LOCAL: this guest, through the loopback transport (Python 3.11 lacks the name)
CID_LOCAL = 1
RETRY_INTERVAL = 0.2
CALL_TIMEOUT = 10.0


async def connect(cid: int, port: int, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Until the agent listens, a connection is reset or refused: retry, but not forever."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (cid, port))
            return await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            if loop.time() >= deadline:
                raise OSError(f"no agent at vsock {cid}:{port} within {timeout:g}s: {exc}") from None
        await asyncio.sleep(RETRY_INTERVAL)


async def probe(cid: int, port: int, timeout: float) -> str:
    reader, writer = await connect(cid, port, timeout)
    client = Client(reader, writer, name=f"vsock {cid}:{port}")
    try:
        check = await client.call(AGENT_SERVICE, "Check", agent_pb2.CheckRequest(), agent_pb2.CheckResponse,
                                  timeout=CALL_TIMEOUT)
        details = await client.call(AGENT_SERVICE, "GetGuestDetails", agent_pb2.GuestDetailsRequest(),
                                    agent_pb2.GuestDetailsResponse, timeout=CALL_TIMEOUT)
    finally:
        await client.close()
    status = agent_pb2.CheckResponse.ServingStatus.Name(check.status)
    return (f"cid={cid} port={port} status={status} agent_is_init={details.is_init} "
            f"kernel={details.kernel_release}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m kabuto.guest.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--cid", type=int, default=CID_LOCAL)
    parser.add_argument("--port", type=int, default=channel.DEFAULT_VSOCK_PORT)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        answer = asyncio.run(probe(args.cid, args.port, args.timeout))
    except Exception as exc:  # reported on the console, where the host looks
        print(f"KABUTO-VSOCK-FAILED {type(exc).__name__}: {exc}", flush=True)
        return 1
    print(f"KABUTO-VSOCK-OK {answer}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
