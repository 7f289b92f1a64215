"""Entry point: ``python3 -m kabuto.guest [--listen ADDRESS]``.

In the VM the image's /init mounts /proc, /sys, /dev and execs this as PID 1; it then
serves the virtio-serial port named agent.channel.0 and every other agent.channel.N port,
each to its own host connection, all with the same services and container state. On a host
(tests) it listens on ``unix:///path`` or ``vsock://PORT`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from pathlib import Path

from kabuto.guest import channel, init
from kabuto.guest.service import AgentService, read_uptime
from kabuto.protos import AGENT_SERVICE, CONTAINER_SERVICE
from kabuto.ttrpc import Method, Server

log = logging.getLogger("kabuto.guest")

PORT_DISCOVERY_INTERVAL = 0.1


async def load_container_service() -> dict[str, Method]:
    module = await asyncio.to_thread(importlib.import_module, "kabuto.guest.containers")
    return module.ContainerService().methods()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m kabuto.guest", description="Kabuto guest agent")
    parser.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="unix:///path or vsock://PORT instead of the virtio-serial port",
    )
    parser.add_argument(
        "--port-name",
        default=channel.DEFAULT_PORT_NAME,
        help="virtio-serial port to serve (default: %(default)s)",
    )
    parser.add_argument(
        "--port-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the virtio-serial port to appear (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started_uptime: float) -> None:
    loop = asyncio.get_running_loop()
    init.Reaper().install(loop)
    service = AgentService(started_uptime)
    server = Server()
    server.register(AGENT_SERVICE, service.methods())
    # Importing ContainerService takes as long as the rest of the agent: done in a thread
    # while the agent already answers Check, so the host sees it ready sooner.
    server.register_loading(CONTAINER_SERVICE, load_container_service())

    if args.listen is None:
        primary = await channel.wait_for_port(args.port_name, args.port_timeout)
        serving = asyncio.create_task(_serve_ports({args.port_name: primary}, server, args.port_timeout))
    elif args.listen.startswith("unix://"):
        listener = await channel.listen_unix(Path(args.listen.removeprefix("unix://")), server.serve)
        log.info("serving on %s", args.listen)
        serving = asyncio.create_task(listener.serve_forever())
    elif args.listen.startswith("vsock://"):
        try:
            vsock_port = int(args.listen.removeprefix("vsock://"))
        except ValueError:
            raise channel.ChannelError(f"bad vsock address {args.listen!r}: expected vsock://PORT") from None
        listener = await channel.listen_vsock(vsock_port, server.serve)
        log.info("serving on %s", args.listen)
        serving = asyncio.create_task(listener.serve_forever())
    else:
        raise channel.ChannelError(
            f"unsupported listen address {args.listen!r}: use unix:///path or vsock://PORT"
        )

    service.serving_uptime = read_uptime()
    shutdown = asyncio.create_task(service.shutdown_requested.wait())
    done, _ = await asyncio.wait({serving, shutdown}, return_when=asyncio.FIRST_COMPLETED)
    if serving in done:
        serving.result()  # raises what ended it
        raise channel.ChannelError("the agent channel stopped serving")
    log.info("shutdown requested")
    serving.cancel()


async def _serve_ports(first: dict[str, Path], server: Server, discovery_time: float) -> None:
    """Serve the primary port now and every other agent.channel.N port as the guest probes it
    (for ``discovery_time`` seconds), all at once; a port that stops serving ends the agent."""
    loop = asyncio.get_running_loop()
    served: set[str] = set()
    async with asyncio.TaskGroup() as group:

        def serve_new(ports: dict[str, Path]) -> None:
            for name, path in ports.items():
                if name not in served:
                    served.add(name)
                    port = channel.VirtioSerialChannel.open(path)
                    log.info("serving on virtio-serial port %s (%s)", name, path)
                    group.create_task(port.serve_forever(server.serve))

        serve_new(first)
        deadline = loop.time() + discovery_time
        while loop.time() < deadline:
            serve_new(channel.find_ports(channel.PORT_NAME_PREFIX))
            await asyncio.sleep(PORT_DISCOVERY_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    started_uptime = read_uptime()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="kabuto-agent %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(args, started_uptime))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # PID 1 must report and power off whatever happened
        init.fatal(f"{type(exc).__name__}: {exc}")
        return 1
    if init.is_init():
        init.power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
