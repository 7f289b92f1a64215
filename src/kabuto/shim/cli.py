"""``containerd-shim-kabuto-v2``: containerd's shim v2 command line.

containerd runs ``... -namespace NS -address SOCK -publish-binary BIN -id ID start`` in the
bundle directory and reads the shim's ttrpc address from its stdout; ``... -bundle DIR delete``
after a shim died, reading a DeleteResponse from stdout. Without an action the process is the
shim daemon itself (``start`` spawns it with the listening socket already bound, so containerd
can connect at once). Flags are Go-style (``-flag value``), as containerd passes them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp

from kabuto.bounded import FileTooLarge, read_bounded
from kabuto.errors import KabutoError, ProtocolError
from kabuto.hypervisor.vmm_process import MAX_UNIX_PATH
from kabuto.protos import containerd_shim_pb2 as pb
from kabuto.runtime.bundle import SANDBOX_ID_ANNOTATION, ContainerIdError
from kabuto.runtime.sandbox import VirtSandbox, remove_dead_sandbox
from kabuto.runtime.state import STATE_ROOT_ENV, StateError, StateStore
from kabuto.shim import mounts
from kabuto.shim.events import Publisher
from kabuto.shim.service import TASK_SERVICE, TaskService
from kabuto.ttrpc import Client, RpcError, Server

log = logging.getLogger("kabuto.shim")

RUNTIME_NAME = "io.containerd.kabuto.v2"
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"
SOCKET_DIR = ".shim"
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_OPTIONS_BYTES = 1024 * 1024
CONNECT_TIMEOUT = 2.0
# a live shim's Shutdown (abandoning its creates), asked by `shim delete`
RELEASE_TIMEOUT = 30.0
# containerd marks a task whose shim died as killed
DEAD_SHIM_EXIT_STATUS = 128 + signal.SIGKILL
EVENT_FLUSH_TIMEOUT = 5.0


class ShimError(KabutoError):
    """The shim cannot start or clean up; the message says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="containerd-shim-kabuto-v2",
                                     description=f"containerd shim v2 for Kabuto ({RUNTIME_NAME})")
    for flag in ("namespace", "id", "address", "publish-binary", "bundle"):
        parser.add_argument(f"-{flag}", f"--{flag}", default="", dest=flag.replace("-", "_"))
    parser.add_argument("-debug", "--debug", action="store_true")
    parser.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("-listen-fd", "--listen-fd", type=int, default=-1, dest="listen_fd",
                        help=argparse.SUPPRESS)  # how `start` hands its daemon the bound socket
    parser.add_argument("action", nargs="?", choices=("start", "delete"))
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from kabuto import __version__
        print(f"containerd-shim-kabuto-v2:\n  Version: {__version__}\n  Runtime: {RUNTIME_NAME}")
        return 0
    try:
        if not args.namespace:
            raise ShimError("shim namespace cannot be empty (-namespace)")
        if not args.id:
            raise ShimError("shim id cannot be empty (-id)")
        if args.action == "start":
            print(start(args), end="")
            return 0
        if args.action == "delete":
            sys.stdout.buffer.write(asyncio.run(cleanup(args)).SerializeToString())
            return 0
        if args.listen_fd < 0:
            raise ShimError("the shim daemon is started by `start`, with the socket it serves")
        return asyncio.run(serve(args))
    except KabutoError as exc:
        print(f"containerd-shim-kabuto-v2: {exc}", file=sys.stderr)
        return 1


# -- addresses ---------------------------------------------------------------------------------
def _grouping(bundle: Path, task_id: str) -> str:
    """The pod a task belongs to (CRI's sandbox id), else the task itself."""
    config = bundle / "config.json"
    try:
        spec = json.loads(read_bounded(config, MAX_SPEC_BYTES))
    except FileTooLarge:
        spec = None
    except (OSError, ValueError) as exc:
        raise ShimError(f"cannot read {config}: {exc}") from None
    if not isinstance(spec, dict):
        raise ShimError(f"{config} is not an OCI spec (a JSON object of at most {MAX_SPEC_BYTES} bytes)")
    annotations = spec.get("annotations") or {}
    group = annotations.get(SANDBOX_ID_ANNOTATION) if isinstance(annotations, dict) else None
    return group if isinstance(group, str) and group else task_id


def socket_path(store: StateStore, containerd_address: str, namespace: str, group: str) -> Path:
    # hashed: short enough for sun_path, distinct per containerd instance, namespace and pod
    digest = hashlib.sha256(f"{containerd_address}\0{namespace}\0{group}".encode()).hexdigest()[:32]
    return store.root / SOCKET_DIR / digest


def _can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _write_address(address: str) -> None:
    # containerd reads "address" in the bundle when it restarts, to find the shim again
    temporary = Path(".address")
    temporary.write_text(address)
    temporary.rename("address")


# -- start -------------------------------------------------------------------------------------
def start(args: argparse.Namespace) -> str:
    """Return the address of the pod's shim, spawning it unless it already serves."""
    _drain_options()
    bundle = Path.cwd()
    store = StateStore()
    path = socket_path(store, args.address, args.namespace, _grouping(bundle, args.id))
    address = f"unix://{path}"
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ShimError(f"the shim socket path {path} is too long (more than {MAX_UNIX_PATH} bytes): "
                        f"use a shorter state root (${STATE_ROOT_ENV})")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(str(path))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ShimError(f"cannot create the shim socket {path}: {exc.strerror or exc}") from None
            if _can_connect(path):  # the pod's shim already runs: the task joins it
                _write_address(address)
                return address
            path.unlink()
            listener.bind(str(path))
        listener.listen(64)
        _write_address(address)
        command = [sys.executable, "-m", "kabuto.shim", "-namespace", args.namespace, "-id", args.id,
                   "-address", args.address, "-publish-binary", args.publish_binary,
                   "-listen-fd", str(listener.fileno())]
        if args.debug:
            command.append("-debug")
        # own session and no inherited stdio: containerd waits for `start`'s output to close
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, pass_fds=(listener.fileno(),), start_new_session=True,
                         cwd=bundle)
    except BaseException:
        _remove_socket(path)
        raise
    finally:
        listener.close()
    return address


def _drain_options() -> None:
    """containerd writes the task options to `start`'s stdin; the task's Create carries them too."""
    if not sys.stdin.isatty():
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read(MAX_OPTIONS_BYTES)


# -- delete (after a shim died) ------------------------------------------------------------------
async def cleanup(args: argparse.Namespace) -> pb.DeleteResponse:
    """Remove what a dead shim left of task ``args.id``: its VM if it was the sandbox's task,
    its rootfs mount and its share; containerd then removes the bundle."""
    store = StateStore()
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    with contextlib.suppress(ShimError):
        path = socket_path(store, args.address, args.namespace, _grouping(bundle, args.id))
        if path.exists() and _can_connect(path):
            # first: a create it still runs ends (and removes what it made) before what is left
            # is looked for below
            await _release_live_shim(path)
    try:
        # a sandbox still booting has its record but not yet its container
        booting = store.record_path(args.id).is_file()
        record = store.load(args.id) if booting else store.find_container(args.id)
    except (StateError, ContainerIdError):
        record = None
    if record is not None:
        if record.id == args.id:
            if record.hypervisor_state:
                sandbox = await VirtSandbox.attach(record.id, store)
                await sandbox.destroy()
            else:
                await remove_dead_sandbox(store, record.id)
        else:
            sandbox = await VirtSandbox.attach(record.id, store)
            await sandbox.release_container(args.id)
    await mounts.unmount(bundle / "rootfs")
    with contextlib.suppress(ShimError):
        path = socket_path(store, args.address, args.namespace, _grouping(bundle, args.id))
        if path.exists() and not _can_connect(path):
            _remove_socket(path)
    exited_at = Timestamp()
    exited_at.GetCurrentTime()
    return pb.DeleteResponse(exit_status=DEAD_SHIM_EXIT_STATUS, exited_at=exited_at)


async def _release_live_shim(path: Path) -> None:
    """containerd runs `delete` whenever a task's connection closes, so the shim may still run:
    Shutdown makes a shim with no task abandon the creates it still runs (their VM and files go)
    and exit. A shim serving tasks ignores it: a pod's shim after one member's delete, or a
    task's shim on its way out."""
    try:
        client = Client(*await asyncio.wait_for(asyncio.open_unix_connection(str(path)), CONNECT_TIMEOUT),
                        name=f"shim at {path}")
    except (OSError, TimeoutError):
        return
    try:
        await client.call(TASK_SERVICE, "Shutdown", pb.ShutdownRequest(), Empty, timeout=RELEASE_TIMEOUT)
    except (RpcError, ProtocolError):
        pass  # it went meanwhile
    finally:
        await client.close()


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    _remove_socket_dir(path.parent)


def _remove_socket_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()  # only once the last shim of this state root is gone


# -- the daemon ----------------------------------------------------------------------------------
def _setup_logging(debug: bool) -> None:
    """Log to the ``log`` FIFO containerd reads in the bundle (it copies it to its own log)."""
    with contextlib.suppress(OSError):
        # non-blocking: a containerd that stopped reading must not stall the shim
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.dup2(fd, 2)
        os.close(fd)
    logging.raiseExceptions = False  # a full or broken log pipe drops lines, nothing else
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format=f"time=%(asctime)s level=%(levelname)s runtime={RUNTIME_NAME} "
                               f"pid={os.getpid()} msg=%(message)s")
    # QMP's protocol chatter would drown the shim's own debug lines
    logging.getLogger("qemu").setLevel(logging.INFO)


def _forget_signal_handlers() -> None:
    """In a forked child (pyroute2 forks one to open a socket in the pod's netns, then SIGTERMs
    it): SIGTERM and SIGINT kill it as usual. Inherited, asyncio's wakeup fd is the parent's own
    socket, so the child's SIGTERM would reach the shim's loop and shut the shim down."""
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)


async def serve(args: argparse.Namespace) -> int:
    _setup_logging(args.debug)
    listener = socket.socket(fileno=args.listen_fd)
    path = Path(listener.getsockname())
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    publisher = Publisher(os.environ.get(TTRPC_ADDRESS_ENV, ""), args.namespace)
    # Shutdown answers first, then the shim goes
    service = TaskService(StateStore(), publisher, on_idle=lambda: loop.call_later(0.05, done.set))
    server = Server()
    server.register(TASK_SERVICE, service.methods())
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, done.set)
    os.register_at_fork(after_in_child=_forget_signal_handlers)
    # containerd's shim would hold the same: SIGPIPE from a gone FIFO reader is an error, not death
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.serve(reader, writer, name="containerd")

    unix_server = await asyncio.start_unix_server(on_connection, sock=listener)
    log.info("shim for %s serving at %s", args.id, path)
    try:
        await done.wait()
    finally:
        unix_server.close()
        await asyncio.to_thread(_remove_socket, path)
        await service.close()
        await publisher.flush(EVENT_FLUSH_TIMEOUT)
        await publisher.close()
        log.info("shim for %s exits", args.id)
    return 0
