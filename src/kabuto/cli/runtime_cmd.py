"""runc's command line: run, create, start, state, pause, resume, update, kill, delete, exec, list, ps.

The global options come from the ``kabuto`` group (kabuto.cli.main); ``--root`` (global, or
after the verb, or ``$KABUTO_STATE_ROOT``) moves the state directory away from ``/run/kabuto``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import termios
import threading
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click

from kabuto.errors import KabutoError
from kabuto.runtime import commands, streaming
from kabuto.runtime.bundle import default_spec, join_network_namespace, load_process_file
from kabuto.runtime.busybox import make_busybox_rootfs
from kabuto.runtime.sandbox import DEFAULT_BOOT_TIMEOUT
from kabuto.runtime.state import StateStore, default_state_root

# SIGWINCH resizes the container's terminal instead of being forwarded
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2, signal.SIGWINCH)
STDIN_CHUNK = 64 * 1024
# Chunks read from our stdin wait here for the agent; a bounded queue gives back-pressure.
STDIN_QUEUE_CHUNKS = 16
# runc exec's status when the exec itself fails (every lower one may be the process's own)
EXEC_FAILED = 255
# `update -r`: the guest accepts at most 1 MiB of OCI JSON
MAX_RESOURCES_BYTES = 1 << 20


def _options(ctx: click.Context, root: Path | None, boot_timeout: float = DEFAULT_BOOT_TIMEOUT
             ) -> commands.RuntimeOptions:
    obj = ctx.find_object(dict) or {}
    return commands.RuntimeOptions(StateStore(root or obj.get("root") or default_state_root()),
                                   obj.get("config_path"), obj.get("hypervisor_name"), boot_timeout,
                                   systemd_cgroup=bool(obj.get("systemd_cgroup")))


def _root_option(function: Callable[..., Any]) -> Callable[..., Any]:
    # also a global option, as runc has it; given here it wins
    return click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="State directory (default: the global --root, $KABUTO_STATE_ROOT, "
                             "/run/kabuto).")(function)


def _boot_timeout_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--boot-timeout", type=click.FloatRange(min=1.0), default=DEFAULT_BOOT_TIMEOUT,
                        show_default=True, help="Seconds to boot the VM and reach its agent.")(function)


# -- stdio plumbing ----------------------------------------------------------------------------
async def _write_fd(fd: int, data: bytes) -> None:
    def write_all() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    await asyncio.get_running_loop().run_in_executor(None, write_all)


def _sink(fd: int) -> streaming.Sink:
    async def sink(data: bytes) -> None:
        try:
            await _write_fd(fd, data)
        except BrokenPipeError:
            pass  # our reader went away: keep draining so the process is not blocked

    return sink


async def _stdin_chunks() -> AsyncIterator[bytes]:
    """Our stdin, read by a daemon thread (a blocked read cannot be cancelled, so it must not
    hold up the exit), handed over through a bounded queue."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(STDIN_QUEUE_CHUNKS)

    def reader() -> None:
        while True:
            try:
                data = os.read(0, STDIN_CHUNK)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            except (RuntimeError, asyncio.CancelledError):
                return  # the loop is gone
            if not data:
                return

    threading.Thread(target=reader, name="kabuto-stdin", daemon=True).start()
    while data := await queue.get():
        yield data


def _stdio(terminal: bool) -> streaming.ProcessIO:
    stdin_open = True
    try:
        os.fstat(0)
    except OSError:
        stdin_open = False
    terminal_size = _terminal_size if terminal and os.isatty(0) else None
    return streaming.ProcessIO(stdout=_sink(1), stderr=_sink(2),
                               stdin=_stdin_chunks() if stdin_open else None, terminal_size=terminal_size)


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size(0)
    return size.lines, size.columns


def _signal_forwarding(forward: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    for number in FORWARDED_SIGNALS:
        loop.add_signal_handler(number, forward, int(number))


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """With ``process.terminal``, keystrokes (Ctrl-C included) go to the container's terminal."""
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _exit_with(ctx: click.Context, status: int) -> None:
    # A shell reports 128+N for a signal; exit codes are one byte either way.
    ctx.exit(status & 0xFF)


# -- commands ----------------------------------------------------------------------------------
@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option("-b", "--bundle", type=click.Path(file_okay=False), default=None,
              help="Bundle directory holding config.json (default: the current directory).")
@click.option("--rootfs", type=click.Path(exists=True, file_okay=False), default=None,
              help="Run ARGS in this root filesystem with a spec like `runc spec` makes (no bundle needed).")
@click.option("--busybox", is_flag=True,
              help="Like --rootfs, with a throw-away rootfs made from the host's busybox-static.")
@click.option("--name", default=None, help="Container id with --rootfs (default: a random one).")
@click.option("--net", "netns", default=None, metavar="PATH",
              help="With --rootfs/--busybox: the network namespace (e.g. /run/netns/NAME, made by CNI or "
                   "`ip netns add`) whose interfaces the VM gets.")
@_root_option
@_boot_timeout_option
@click.argument("args", nargs=-1, required=True)
@click.pass_context
def run_command(ctx: click.Context, bundle: str | None, rootfs: str | None, busybox: bool, name: str | None,
                netns: str | None, root: Path | None, boot_timeout: float, args: tuple[str, ...]) -> None:
    """Create and start a container, stream its stdio, and exit with its exit code.

    \b
    kabuto run --bundle DIR ID
    kabuto run --rootfs DIR -- CMD [ARGS...]
    kabuto run --busybox -- CMD [ARGS...]
    """
    options = _options(ctx, root, boot_timeout)
    if sum((bundle is not None, rootfs is not None, busybox)) > 1:
        raise click.UsageError("give one of --bundle, --rootfs and --busybox")
    if rootfs is None and not busybox and len(args) != 1:
        raise click.UsageError("expected exactly one container id (or --rootfs DIR -- CMD ARGS...)")
    if netns is not None and rootfs is None and not busybox:
        raise click.UsageError("--net goes with --rootfs or --busybox; a bundle's config.json names its "
                               "network namespace (linux.namespaces)")
    temporary = tempfile.mkdtemp(prefix="kabuto-bundle-") if rootfs is not None or busybox else None
    try:
        if temporary is not None:
            container_id = name or f"run-{secrets.token_hex(4)}"
            root_dir = make_busybox_rootfs(Path(temporary, "rootfs")) if busybox else Path(str(rootfs))
            spec = default_spec(list(args), str(root_dir.absolute()), terminal=False)
            if netns is not None:
                join_network_namespace(spec, str(Path(netns).absolute()))
            Path(temporary, "config.json").write_text(json.dumps(spec, indent=2))
            bundle = temporary
        else:
            container_id = args[0]
        bundle_dir = bundle or os.getcwd()
        terminal = _spec_terminal(bundle_dir)
        with _raw_terminal(terminal):
            status = asyncio.run(
                commands.run(container_id, bundle_dir, options, _stdio(terminal), _signal_forwarding))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    _exit_with(ctx, status)


def _spec_terminal(bundle_dir: str) -> bool:
    # config.json is checked properly by the runtime; here only its terminal flag matters
    with contextlib.suppress(OSError, ValueError, AttributeError):
        spec = json.loads(Path(bundle_dir, "config.json").read_text())
        return bool(spec.get("process", {}).get("terminal"))
    return False


@click.command("create")
@click.option("-b", "--bundle", type=click.Path(file_okay=False), default=None,
              help="Bundle directory holding config.json (default: the current directory).")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the pid of the host process standing for the container here.")
@click.option("--console-socket", type=click.Path(dir_okay=False), default=None,
              help="Unix socket that receives the pty master (process.terminal), as runc sends it.")
@click.option("--no-pivot", is_flag=True,
              help="Accepted for runc's callers; the guest always pivots into the rootfs (the VM is "
                   "the boundary; runc's reason for it, a ramdisk root, does not arise).")
@click.option("--no-new-keyring", is_flag=True,
              help="Accepted: the guest never makes a session keyring for the container.")
@click.option("--preserve-fds", type=click.IntRange(min=0), default=0,
              help="Host fds do not reach a process in a VM: only 0 is accepted.")
@_root_option
@_boot_timeout_option
@click.argument("container_id")
@click.pass_context
def create_command(ctx: click.Context, bundle: str | None, pid_file: str | None, console_socket: str | None,
                   no_pivot: bool, no_new_keyring: bool, preserve_fds: int, root: Path | None,
                   boot_timeout: float, container_id: str) -> None:
    """Create a container (its VM boots; its process waits for `start`).

    As under runc, a host process stays standing for the container's process (its pid is the
    one --pid-file and `state` give): it keeps this command's stdio (or the pty sent over
    --console-socket), forwards the signals it gets, and exits with the container's status.
    """
    options = _options(ctx, root, boot_timeout)
    bundle_dir = bundle or os.getcwd()
    _check_preserve_fds(preserve_fds)
    _check_pid_file(pid_file)
    with _console(console_socket, _spec_terminal(bundle_dir)) as console_fd:
        pid = asyncio.run(commands.create_detached(container_id, bundle_dir, options, console_fd=console_fd))
    try:
        _write_pid_file(pid_file, pid)
    except BaseException:
        asyncio.run(commands.delete(container_id, options, force=True))
        raise


def _check_preserve_fds(count: int) -> None:
    if count:
        raise click.ClickException(f"--preserve-fds {count}: host file descriptors cannot be passed "
                                   "into a VM")


def _check_pid_file(pid_file: str | None) -> None:
    """A pid file that cannot be written fails before anything is made (runc fails after, then
    destroys the container)."""
    if pid_file is not None and not Path(pid_file).absolute().parent.is_dir():
        raise click.ClickException(f"--pid-file: open {pid_file}: no such file or directory")


def _write_pid_file(pid_file: str | None, pid: int) -> None:
    """As runc: written whole under a temporary name, then renamed, so a reader never sees half."""
    if pid_file is None:
        return
    path = Path(pid_file).absolute()
    temporary = path.with_name(f".{path.name}.kabuto-tmp")
    try:
        temporary.write_text(str(pid))
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write the pid file {pid_file}: {exc.strerror}") from None


@contextlib.contextmanager
def _console(console_socket: str | None, terminal: bool, detached: bool = True) -> Iterator[int | None]:
    """The connected console socket's fd for a process with a terminal, checked as runc checks it."""
    if console_socket is None:
        if terminal and detached:
            raise click.ClickException("cannot allocate tty if runc will detach without setting console "
                                       "socket")
        yield None
        return
    if not terminal:
        raise click.ClickException("cannot use console socket if runc will not detach or allocate tty")
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(console_socket)
    except OSError as exc:
        connection.close()
        raise click.ClickException(f"--console-socket: dial unix {console_socket}: connect: "
                                   f"{exc.strerror or exc}") from None
    with connection:
        yield connection.fileno()


def _container_verb(name: str, verb: Callable[[str, commands.RuntimeOptions], Awaitable[Any]],
                    doc: str) -> click.Command:
    """A command that takes only CONTAINER_ID (and --root) and runs one runtime verb."""
    @click.command(name, help=doc)
    @_root_option
    @click.argument("container_id")
    @click.pass_context
    def command(ctx: click.Context, root: Path | None, container_id: str) -> None:
        asyncio.run(verb(container_id, _options(ctx, root)))
    return command


start_command = _container_verb("start", commands.start, "Start a created container's process.")
pause_command = _container_verb("pause", commands.pause, "Freeze every process of a running container.")
resume_command = _container_verb("resume", commands.resume, "Let a paused container run again.")


@click.command("state")
@_root_option
@click.argument("container_id")
@click.pass_context
def state_command(ctx: click.Context, root: Path | None, container_id: str) -> None:
    """Print the container's OCI state as JSON."""
    click.echo(json.dumps(asyncio.run(commands.state(container_id, _options(ctx, root))), indent=2))


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """runc's memory sizes: bytes, or 512k / 64m / 1g (powers of 1024); -1 for no limit."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(-1|\d+)\s*(?:([kmgt])i?b?|b)?\s*", value, re.IGNORECASE)
    if match is None or (match[1] == "-1" and match[2]):
        raise click.BadParameter(f"{value!r} is not a size (like 1048576, 512k, 64m, 1g or -1)")
    return int(match[1]) * 1024 ** ("kmgt".index(match[2].lower()) + 1 if match[2] else 0)


# update's options -> where they go in linux.resources
UPDATE_OPTIONS = {
    "memory": ("memory", "limit"),
    "memory_reservation": ("memory", "reservation"),
    "memory_swap": ("memory", "swap"),
    "cpu_period": ("cpu", "period"),
    "cpu_quota": ("cpu", "quota"),
    "cpu_share": ("cpu", "shares"),
    "cpuset_cpus": ("cpu", "cpus"),
    "cpuset_mems": ("cpu", "mems"),
    "pids_limit": ("pids", "limit"),
}


def _read_resources(source: str) -> dict[str, Any]:
    try:
        with click.open_file(source, "rb") as file:
            raw = file.read(MAX_RESOURCES_BYTES + 1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {source}: {exc.strerror or exc}", param_hint="-r") from None
    if len(raw) > MAX_RESOURCES_BYTES:
        raise click.BadParameter(f"{source} is larger than {MAX_RESOURCES_BYTES} bytes", param_hint="-r")
    try:
        resources = json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"{source} is not JSON: {exc}", param_hint="-r") from None
    if not isinstance(resources, dict):
        raise click.BadParameter(f"{source} must hold a JSON object (linux.resources)", param_hint="-r")
    return resources


@click.command("update")
@click.option("-r", "--resources", "resources_file", default=None, metavar="FILE",
              help="JSON of an OCI linux.resources object ('-': standard input); no other option then.")
@click.option("--memory", callback=_size, help="Memory limit (bytes, or 512k, 64m, 1g; -1: none).")
@click.option("--memory-reservation", callback=_size, help="Memory soft limit (memory.low).")
@click.option("--memory-swap", callback=_size, help="Memory plus swap limit, as runc counts it.")
@click.option("--cpu-period", type=int, help="CPU CFS period in microseconds.")
@click.option("--cpu-quota", type=int, help="CPU CFS quota in microseconds per period (-1: none).")
@click.option("--cpu-share", type=int, help="CPU shares (relative weight).")
@click.option("--cpuset-cpus", help="CPUs to use (0-2, 0,1).")
@click.option("--cpuset-mems", help="Memory nodes to use.")
@click.option("--pids-limit", type=int, help="Maximum number of processes (-1: none).")
@_root_option
@click.argument("container_id")
@click.pass_context
def update_command(ctx: click.Context, resources_file: str | None, root: Path | None, container_id: str,
                   **limits: Any) -> None:
    """Change a container's cgroup limits, like `runc update`."""
    given = {name: value for name, value in limits.items() if value is not None}
    if resources_file is not None and given:
        raise click.UsageError("give either -r FILE or limit options, not both")
    if resources_file is None and not given:
        raise click.UsageError("nothing to update: give -r FILE or a limit option")
    resources: dict[str, Any] = {}
    if resources_file is not None:
        resources = _read_resources(resources_file)
    for name, value in given.items():
        section, key = UPDATE_OPTIONS[name]
        resources.setdefault(section, {})[key] = value
    asyncio.run(commands.update(container_id, resources, _options(ctx, root)))


@click.command("kill")
@click.option("-a", "--all", "all_processes", is_flag=True, help="Signal every process of the container.")
@_root_option
@click.argument("container_id")
@click.argument("signal_name", default="SIGTERM")
@click.pass_context
def kill_command(ctx: click.Context, all_processes: bool, root: Path | None, container_id: str,
                 signal_name: str) -> None:
    """Send SIGNAL (name or number, default SIGTERM) to the container's process."""
    asyncio.run(commands.kill(container_id, signal_name, _options(ctx, root), all_processes=all_processes))


@click.command("delete")
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@_root_option
@click.argument("container_id")
@click.pass_context
def delete_command(ctx: click.Context, force: bool, root: Path | None, container_id: str) -> None:
    """Delete a stopped container (its sandbox's VM stops with its last container)."""
    asyncio.run(commands.delete(container_id, _options(ctx, root), force=force))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-t", "--tty", "terminal", is_flag=True, help="Give the process a terminal.")
@click.option("-e", "--env", multiple=True, help="KEY=VALUE added to the environment (repeatable).")
@click.option("--cwd", default=None, help="Working directory inside the container.")
@click.option("-u", "--user", default=None, metavar="UID[:GID]", help="User (and group) ids to run as.")
@click.option("-g", "--additional-gids", type=click.IntRange(min=0), multiple=True,
              help="Supplementary group id (repeatable).")
@click.option("-c", "--cap", "caps", multiple=True,
              help="Capability added to the process's sets (repeatable).")
@click.option("--no-new-privs", is_flag=True, help="Set no_new_privs for the process.")
@click.option("-p", "--process", "process_file", type=click.Path(dir_okay=False), default=None,
              help="JSON file of a whole OCI process (args, env, user...) instead of COMMAND and options.")
@click.option("-d", "--detach", is_flag=True,
              help="Start the process and return; a host process stands for it (see --pid-file).")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write the pid of the host process standing for the process here.")
@click.option("--console-socket", type=click.Path(dir_okay=False), default=None,
              help="Unix socket that receives the pty master (with --tty), as runc sends it.")
@click.option("--preserve-fds", type=click.IntRange(min=0), default=0,
              help="Host fds do not reach a process in a VM: only 0 is accepted.")
@_root_option
@click.argument("container_id")
@click.argument("command", nargs=-1)
@click.pass_context
def exec_command(ctx: click.Context, terminal: bool, env: tuple[str, ...], cwd: str | None, user: str | None,
                 additional_gids: tuple[int, ...], caps: tuple[str, ...], no_new_privs: bool,
                 process_file: str | None, detach: bool, pid_file: str | None, console_socket: str | None,
                 preserve_fds: int, root: Path | None, container_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (or the --process file's process) in a running container; exit with its
    exit code, or with --detach return once it runs. As runc's, a failure exits 255 (the
    codes below belong to the process)."""
    try:
        _exec(ctx, terminal, env, cwd, user, additional_gids, caps, no_new_privs, process_file, detach,
              pid_file, console_socket, preserve_fds, root, container_id, command)
    except click.UsageError:
        raise
    except (KabutoError, click.ClickException) as exc:
        reason = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        failure = click.ClickException(f"exec failed: {reason}")
        failure.exit_code = EXEC_FAILED
        raise failure from None


def _exec(ctx: click.Context, terminal: bool, env: tuple[str, ...], cwd: str | None, user: str | None,
          additional_gids: tuple[int, ...], caps: tuple[str, ...], no_new_privs: bool,
          process_file: str | None, detach: bool, pid_file: str | None, console_socket: str | None,
          preserve_fds: int, root: Path | None, container_id: str, command: tuple[str, ...]) -> None:
    options = _options(ctx, root)
    _check_preserve_fds(preserve_fds)
    _check_pid_file(pid_file)
    process = None
    settings: dict[str, Any] = {}
    if process_file is not None:
        given = [name for name, value in (("COMMAND", command), ("--env", env), ("--cwd", cwd),
                                          ("--user", user), ("--additional-gids", additional_gids),
                                          ("--cap", caps), ("--no-new-privs", no_new_privs)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)}: give these in the --process file")
        process = load_process_file(process_file)
        terminal = terminal or bool(process.get("terminal"))
        process["terminal"] = terminal
    else:
        if not command:
            raise click.UsageError("give COMMAND or --process FILE")
        settings = {"env": list(env), "cwd": cwd, "terminal": terminal, "user": user,
                    "additional_gids": list(additional_gids), "caps": list(caps),
                    "no_new_privileges": no_new_privs}
    if detach or console_socket is not None:
        with _console(console_socket, terminal, detached=detach) as console_fd:
            pid = asyncio.run(commands.exec_detached(container_id, list(command), options,
                                                     console_fd=console_fd, process=process, **settings))
        _write_pid_file(pid_file, pid)
        if not detach:
            # the pty went to the console socket's owner: this process only waits for the exec
            _, status = os.waitpid(pid, 0)
            _exit_with(ctx, os.waitstatus_to_exitcode(status))
        return
    # without --detach this process stands for the exec'd one
    _write_pid_file(pid_file, os.getpid())
    with _raw_terminal(terminal):
        status = asyncio.run(commands.exec_in(container_id, list(command), options, _stdio(terminal),
                                              on_signal=_signal_forwarding, process=process, **settings))
    _exit_with(ctx, status)


@click.command("list")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Only container ids.")
@_root_option
@click.pass_context
def list_command(ctx: click.Context, fmt: str, quiet: bool, root: Path | None) -> None:
    """List containers."""
    rows = asyncio.run(commands.list_containers(_options(ctx, root)))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if quiet:
        for row in rows:
            click.echo(row["id"])
        return
    # columns as wide as their longest cell, as runc's tabwriter makes them
    columns = {"ID": "id", "PID": "pid", "STATUS": "status", "BUNDLE": "bundle", "CREATED": "created"}
    table = [list(columns), *([str(row[key]) for key in columns.values()] for row in rows)]
    widths = [max(len(line[i]) for line in table) + 3 for i in range(len(columns))]
    for line in table:
        click.echo("".join(f"{cell:<{width}}" for cell, width in zip(line, widths, strict=True)).rstrip())


@click.command("ps")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@_root_option
@click.argument("container_id")
@click.pass_context
def ps_command(ctx: click.Context, fmt: str, root: Path | None, container_id: str) -> None:
    """List the container's processes (pids inside the VM)."""
    pids = asyncio.run(commands.ps(container_id, _options(ctx, root)))
    if fmt == "json":
        click.echo(json.dumps(pids))
        return
    click.echo("PID")
    for pid in pids:
        click.echo(pid)


class GoDuration(click.ParamType):
    """runc's duration flags (Go's time.ParseDuration: ``5s``, ``1m30s``, ``500ms``), in seconds."""

    name = "duration"
    UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value)
        parts = self.PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            self.fail(f"invalid duration {text!r} (e.g. 5s, 500ms, 1m)", param, ctx)
        seconds = sum(float(n) * self.UNITS[u] for n, u in parts)
        if seconds < 0.1:
            self.fail(f"{text!r} is shorter than 100ms", param, ctx)
        return seconds


@click.command("events")
@click.option("--stats", "once", is_flag=True, help="Print the container's stats once and exit.")
@click.option("--interval", type=GoDuration(), default="5s", show_default=True,
              help="Time between stats lines (without --stats), as runc's: 5s, 500ms...")
@_root_option
@click.argument("container_id")
@click.pass_context
def events_command(ctx: click.Context, once: bool, interval: float, root: Path | None,
                   container_id: str) -> None:
    """Print the container's cgroup stats as runc's `events` does: one JSON line each interval
    until it stops, and an `oom` event when the guest's OOM killer took one of its processes
    since the previous line (read each interval: runc reports it as it happens)."""
    options = _options(ctx, root)
    oom_kills: int | None = None
    while True:
        try:
            line, kills = asyncio.run(commands.stats(container_id, options))
        except KabutoError:
            if once:
                raise
            return  # the container stopped or went: the stream ends, as runc's does
        if not once and kills is not None and oom_kills is not None and kills > oom_kills:
            click.echo(json.dumps({"type": "oom", "id": container_id}))
        oom_kills = kills
        click.echo(json.dumps(line))
        if once:
            return
        time.sleep(interval)


#: why runc's checkpoint/restore verbs are refused by name
NO_CHECKPOINT = ("runc dumps a container's processes with CRIU and restores them in place of a "
                 "container; a Kabuto container's processes live in a VM whose snapshot holds the whole "
                 "sandbox (every container of the pod, the guest agent and kernel), not one container")


def _refused_verb(name: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def refuse(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"{name} is not supported: {NO_CHECKPOINT}")

    refuse.help = f"Refused: {NO_CHECKPOINT}."
    return refuse


def register(cli: click.Group) -> None:
    for command in (run_command, create_command, start_command, state_command, pause_command, resume_command,
                    update_command, kill_command, delete_command, exec_command, list_command, ps_command,
                    events_command, _refused_verb("checkpoint"), _refused_verb("restore")):
        cli.add_command(command)

