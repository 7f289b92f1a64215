"""Entry point: ``python3 -m kabuto.guest [--listen ADDRESS]``.

In the VM the image's /init mounts /proc, /sys, /dev and execs this as PID 1; it then
serves every channel the VM has, each host connection a session with the same services and
container state: the virtio-serial port named agent.channel.0 and every other agent.channel.N
port, and AF_VSOCK port 1024 (``--vsock-port``) when a virtio vsock device is bound (QEMU's
vhost-vsock, the hybrid vsock of Firecracker, Cloud Hypervisor and Dragonball). On a host
(tests) it listens on ``unix:///path`` or ``vsock://PORT`` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from pathlib import Path

from kabuto.guest import channel, init, netlink
from kabuto.guest.service import AgentService, read_uptime
from kabuto.guest.uevents import DeviceEvents
from kabuto.protos import AGENT_SERVICE, CONTAINER_SERVICE
from kabuto.ttrpc import Method, Server

log = logging.getLogger("kabuto.guest")

# Ports and a vsock device that appear later are looked for when the kernel announces a device;
# this scan only backs the announcement up (and is the cadence where the kernel gives none).
PORT_DISCOVERY_BACKSTOP = 1.0


async def load_container_service() -> dict[str, Method]:
    module = await asyncio.to_thread(importlib.import_module, "kabuto.guest.containers")
    return module.ContainerService().methods()


def vsock_port(text: str) -> int:
    port = int(text)
    # 0xFFFFFFFF is VMADDR_PORT_ANY
    if not 0 < port < 0xFFFFFFFF:
        raise ValueError(text)
    return port


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
        help="seconds to wait for a virtio-serial port or vsock device to appear, and to look for"
        " more agent ports and a late vsock device after that (default: %(default)s)",
    )
    parser.add_argument(
        "--vsock",
        choices=channel.VSOCK_MODES,
        default="auto",
        help="serve AF_VSOCK when a virtio vsock device is bound (auto), also without one, e.g. over"
        " the loopback transport at CID 1 (on), or never (off) (default: %(default)s)",
    )
    parser.add_argument(
        "--vsock-port",
        type=vsock_port,
        default=channel.DEFAULT_VSOCK_PORT,
        help="AF_VSOCK port to serve (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started_uptime: float) -> None:
    loop = asyncio.get_running_loop()
    init.Reaper().install(loop)
    try:
        netlink.loopback_up()  # here, not in /init: no fork for it
    except OSError as exc:
        log.warning("cannot bring lo up: %s", exc)
    service = AgentService(started_uptime)
    server = Server()
    server.register(AGENT_SERVICE, service.methods())
    # Importing ContainerService takes as long as the rest of the agent: done in a thread
    # while the agent already answers Check, so the host sees it ready sooner.
    server.register_loading(CONTAINER_SERVICE, load_container_service())

    if args.listen is None:
        found = await channel.wait_for_channels(args.port_name, args.vsock, args.port_timeout)
        serving = asyncio.create_task(_serve_channels(found, args, server))
    elif args.listen.startswith("unix://"):
        listener = await channel.listen_unix(Path(args.listen.removeprefix("unix://")), server.serve)
        log.info("serving on %s", args.listen)
        serving = asyncio.create_task(listener.serve_forever())
    elif args.listen.startswith("vsock://"):
        try:
            port = int(args.listen.removeprefix("vsock://"))
        except ValueError:
            raise channel.ChannelError(f"bad vsock address {args.listen!r}: expected vsock://PORT") from None
        listener = await channel.listen_vsock(port, server.serve)
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


async def _serve_channels(first: channel.Channels, args: argparse.Namespace, server: Server) -> None:
    """Serve the channels found, then every agent.channel.N port the guest probes later and (auto)
    a vsock device bound later, for ``--port-timeout`` seconds, all at once; a channel that stops
    serving ends the agent."""
    loop = asyncio.get_running_loop()
    served: set[str] = set()
    vsock_served = False
    async with asyncio.TaskGroup() as group:

        def serve_ports(ports: dict[str, Path]) -> None:
            for name, path in ports.items():
                if name not in served:
                    served.add(name)
                    port = channel.VirtioSerialChannel.open(path)
                    log.info("serving on virtio-serial port %s (%s)", name, path)
                    group.create_task(port.serve_forever(server.serve))

        async def serve_vsock() -> None:
            nonlocal vsock_served
            vsock_served = True
            listener = await channel.listen_vsock(args.vsock_port, server.serve)
            devices = ", ".join(channel.vsock_devices() or ["none"])
            log.info("serving on vsock port %d (vsock device: %s)", args.vsock_port, devices)
            group.create_task(listener.serve_forever())

        serve_ports(first.ports)
        if first.vsock:
            await serve_vsock()
        elif args.vsock != "off":
            log.info("not serving vsock: %s (looking for %gs more)", channel.why_no_vsock(args.vsock),
                     args.port_timeout)
        deadline = loop.time() + args.port_timeout
        with DeviceEvents() as events:
            while (left := deadline - loop.time()) > 0:
                serve_ports(channel.find_ports(channel.PORT_NAME_PREFIX))
                if args.port_name not in served and (primary := channel.find_port(args.port_name)):
                    serve_ports({args.port_name: primary})  # probed after a vsock device was found
                if not vsock_served and channel.serves_vsock(args.vsock):
                    await serve_vsock()
                await events.wait(min(left, PORT_DISCOVERY_BACKSTOP))


def describe(exc: BaseException) -> str:
    """An error for the console; a task group's sub-errors are what ended the agent."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(sub) for sub in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


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
        init.fatal(describe(exc))
        return 1
    if init.is_init():
        init.power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
