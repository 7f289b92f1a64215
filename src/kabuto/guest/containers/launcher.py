"""Starting a container process: the code that runs in forked copies of the agent.

For every process the agent forks a *monitor*, which forks the process itself:

    agent ──fork──► monitor ──fork──► child ──execve──► the container's program

- The monitor joins (exec) or creates (init) the PID namespace, so that its child is in
  it (PID 1 of a new one for a container's init), reports the child's PID, waits for it
  and reports its wait status. A monitor per process keeps the agent free of reaping races:
  the agent never waits for a process it did not fork itself.
- The child joins or creates the other namespaces, builds the container's root (init
  only), applies the OCI process settings, looks the program up, reports ``ready``, waits
  for the start byte (init only, as ``runc create`` / ``runc start``) and execs.
- With a user namespace (init) the child makes it last, once its mounts, devices, hostname,
  sysctls and rlimits are set up as the guest's root (as runc does from outside the namespace);
  its monitor, still the guest's root, writes its uid_map and gid_map. The container's other
  namespaces stay the guest's root's, so root in the container cannot mount or set the hostname:
  it is an unprivileged user of the guest's kernel. An exec joins the user namespace last alike.
- With a terminal the child makes it, as runc does, from the container's own devpts once
  in the container's mounts: the slave becomes its stdio and controlling terminal (and,
  for init, /dev/console) and the master goes to the agent over ``console_socket``
  (SCM_RIGHTS), before ``ready``.

Each side reports on its own pipe, one JSON object per line: the monitor ``{"pid": N}``
then ``{"status": waitstatus}``; the child ``{"ready": true}`` or ``{"error": "..."}``.
The child's pipe is close-on-exec, so its end of file after ``ready`` means the exec
succeeded. Nothing here returns: every path ends in execve or os._exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import signal
import socket
import stat
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn

from kabuto.guest import freshen
from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.spec import CAPABILITIES, ContainerSpec, IdMapping, MountSpec, ProcessSpec

MAX_MESSAGE = 4000  # below PIPE_BUF: each message is one atomic write
MAX_SYMLINKS = 40
MAX_STACKED_MOUNTS = 16
DEFAULT_DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
DEFAULT_UMASK = 0o022  # runc's, whatever the agent's own is
EXIT_SETUP_FAILED = 1
EXIT_EXEC_FAILED = 127


class LaunchError(Exception):
    """Setting the process up failed; the message is for the user."""


@dataclass(frozen=True)
class Launch:
    """What a forked monitor and its child need; every fd here belongs to them after fork."""

    process: ProcessSpec
    stdio: tuple[int, int, int] | None  # the child's 0, 1, 2; None: a terminal, made in the child
    monitor_fd: int  # monitor -> agent
    report_fd: int  # child -> agent
    start_fd: int | None = None  # init: wait for a byte on it before exec
    container: ContainerSpec | None = None  # init: build the container
    # (CLONE_NEW* type, fd) to join: an exec's container's, or those an init shares with another
    namespace_fds: tuple[tuple[int, int], ...] = ()
    pid_namespace_fd: int | None = None  # the container's (exec) or another's (init) PID namespace
    cgroup_procs: str | None = None  # the container cgroup's cgroup.procs to join
    console_socket: int | None = None  # a terminal: the child sends its pty master here
    # init with a user namespace: (child -> monitor "map me", monitor -> child the answer), made by
    # the monitor
    id_map_channel: tuple[int, int] | None = None


def _send(fd: int, message: dict[str, object]) -> None:
    line = json.dumps(message)
    if len(line) > MAX_MESSAGE:
        line = json.dumps(
            {k: (v[: MAX_MESSAGE // 2] if isinstance(v, str) else v) for k, v in message.items()}
        )
    with contextlib.suppress(OSError):
        os.write(fd, line.encode() + b"\n")


def _reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and the agent handles others: a program must
    start with every signal at its default and none blocked, as under runc."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for number in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _close_fds_except(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def run_monitor(launch: Launch) -> NoReturn:
    """In the forked monitor: fork the child, report its PID, wait, report its status."""
    try:
        _reset_signals()
        if launch.container is not None and launch.container.namespaces & sc.CLONE_NEWPID:
            sc.unshare(sc.CLONE_NEWPID)
        elif launch.pid_namespace_fd is not None:
            sc.setns(launch.pid_namespace_fd, sc.CLONE_NEWPID)
        mine: set[int] = set()
        if launch.container is not None and launch.container.namespaces & sc.CLONE_NEWUSER:
            request_r, request_w = os.pipe2(os.O_CLOEXEC)
            answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
            launch = replace(launch, id_map_channel=(request_w, answer_r))
            mine = {request_r, answer_w}
        pid = os.fork()
        if pid == 0:
            run_child(launch)
        _close_fds_except({launch.monitor_fd, *mine})
        _send(launch.monitor_fd, {"pid": pid})
        if mine and launch.container is not None:
            _map_child(pid, launch.container, request_r, answer_w)
        _, status = os.waitpid(pid, 0)
        _send(launch.monitor_fd, {"status": status})
    except BaseException as exc:  # a forked copy of the agent must never return into it
        _send(launch.monitor_fd, {"error": f"{exc}"})
    os._exit(0)


def _map_child(pid: int, container: ContainerSpec, request_fd: int, answer_fd: int) -> None:
    """Write the child's uid_map and gid_map when it asks (it has made its user namespace); its
    end of file instead means it failed before, or exec'd: nothing to do."""
    if not os.read(request_fd, 1):
        return
    answer = b"ok"
    for name, mappings in (("uid_map", container.uid_mappings), ("gid_map", container.gid_mappings)):
        try:
            _write_id_map(f"/proc/{pid}/{name}", mappings)
        except OSError as exc:
            answer = f"cannot write the user namespace's {name}: {exc.strerror or exc}".encode()
            break
    with contextlib.suppress(OSError):
        os.write(answer_fd, answer)


def _write_id_map(path: str, mappings: tuple[IdMapping, ...]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:  # the kernel takes a map in one write only
        os.write(fd, "".join(m.line() for m in mappings).encode())
    finally:
        os.close(fd)


def _new_user_namespace(channel: tuple[int, int]) -> None:
    request_fd, answer_fd = channel
    try:
        sc.unshare(sc.CLONE_NEWUSER)
    except OSError as exc:
        raise LaunchError(f"cannot make the user namespace: {exc.strerror or exc}") from None
    os.write(request_fd, b"m")
    answer = os.read(answer_fd, MAX_MESSAGE)
    if answer != b"ok":
        raise LaunchError(answer.decode(errors="replace") or "the monitor ended before mapping the namespace")
    os.close(request_fd)
    os.close(answer_fd)


def _join_user_namespace(fd: int) -> None:
    sc.setns(fd, sc.CLONE_NEWUSER)
    os.close(fd)


def run_child(launch: Launch) -> NoReturn:
    """In the child: become the container process, then exec. Reports ``error`` on failure."""
    code = EXIT_SETUP_FAILED
    try:
        if launch.stdio is None:  # /dev/null holds 0, 1, 2 until the terminal exists
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            stdio = [fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, 3) for _ in range(3)]
            os.close(null)
        else:
            stdio = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in launch.stdio]
        keep = {launch.report_fd, *stdio}
        for fd in (launch.start_fd, launch.console_socket, *(launch.id_map_channel or ())):
            if fd is not None:
                keep.add(fd)
        keep.update(fd for _, fd in launch.namespace_fds)
        _close_fds_except(keep)
        for fd in keep:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target, inheritable=True)
            os.close(fd)
        if launch.cgroup_procs is not None:
            with open(launch.cgroup_procs, "w") as procs:
                procs.write("0")
        enter_user_namespace: Callable[[], None] | None = None
        if launch.id_map_channel is not None:
            enter_user_namespace = lambda: _new_user_namespace(launch.id_map_channel)  # noqa: E731
        for ns_type, fd in launch.namespace_fds:  # an exec's mount namespace comes last
            if ns_type == sc.CLONE_NEWUSER:
                enter_user_namespace = lambda fd=fd: _join_user_namespace(fd)  # noqa: E731
                continue
            sc.setns(fd, ns_type)
            os.close(fd)
        if launch.container is not None:
            build_container(launch.container, launch.console_socket)
        elif launch.console_socket is not None:  # an exec's terminal: no /dev/console, as runc
            setup_terminal(launch.console_socket, launch.process.console_size, bind_console=False)
        program = prepare_process(launch.process, enter_user_namespace)
        _send(launch.report_fd, {"ready": True})
        if launch.start_fd is not None:
            if os.read(launch.start_fd, 1) != b"1":
                os._exit(EXIT_SETUP_FAILED)  # the agent dropped the container before starting it
            os.close(launch.start_fd)
        code = EXIT_EXEC_FAILED
        if launch.process.no_new_privileges:
            sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        os.execve(program, list(launch.process.args), environment(launch.process))
    except BaseException as exc:
        _send(launch.report_fd, {"error": str(exc) or type(exc).__name__})
    os._exit(code)


# --- the container's root -------------------------------------------------------------


def secure_join(root: str, path: str) -> str:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were "/"."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except FileNotFoundError:
            is_link = False
        if not is_link:
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise LaunchError(f"too many symbolic links in {path}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *resolved)


def _make_target(path: str, as_file: bool) -> None:
    if as_file:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    else:
        os.makedirs(path, exist_ok=True)


def _mount_one(rootfs: str, mount: MountSpec) -> str:
    target = secure_join(rootfs, mount.destination)
    try:
        if mount.is_bind:
            source_is_dir = os.path.isdir(mount.source)
            if not os.path.exists(mount.source):
                raise LaunchError(f"mount source {mount.source} does not exist in the guest")
            _make_target(target, not source_is_dir)
            sc.mount(mount.source, target, None, sc.MS_BIND | (mount.flags & sc.MS_REC))
            extra = mount.flags & ~(sc.MS_BIND | sc.MS_REC)
            if extra:
                sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | extra)
        else:
            _make_target(target, False)
            fstype = mount.type
            if fstype == "cgroup":
                fstype = "cgroup2"  # the guest has cgroup v2 only, as runc does on a v2 host
            sc.mount(mount.source, target, fstype, mount.flags, mount.data or None)
        if mount.propagation:
            sc.mount(None, target, None, mount.propagation)
    except OSError as exc:
        raise LaunchError(f"cannot mount {mount.destination} ({mount.type}): {exc.strerror or exc}") from None
    return target


def _bind_sandbox_boot_id(rootfs: str) -> None:
    """The sandbox's own boot id over the kernel's in the container's /proc (the kernel's is the
    template's in every clone, and read-only), read-only; a container without /proc has none."""
    if not os.path.isfile(freshen.SANDBOX_BOOT_ID):
        return
    target = secure_join(rootfs, freshen.KERNEL_BOOT_ID)
    if not os.path.isfile(target):
        return
    sc.mount(freshen.SANDBOX_BOOT_ID, target, None, sc.MS_BIND)
    _remount_readonly(target)


def _create_devices(rootfs: str, container: ContainerSpec) -> None:
    dev = secure_join(rootfs, "/dev")
    for name, major, minor in DEFAULT_DEVICES:
        path = os.path.join(dev, name)
        if not os.path.lexists(path):
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)  # mknod applies the umask
    for device in container.devices:
        path = secure_join(rootfs, device.path)
        kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[device.type]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.mknod(path, kind | device.mode, os.makedev(device.major, device.minor))
        os.chmod(path, device.mode)
        os.chown(path, device.uid, device.gid)
    for name, target in DEV_SYMLINKS:
        with contextlib.suppress(FileExistsError):
            os.symlink(target, os.path.join(dev, name))
    if os.path.isdir(os.path.join(dev, "pts")):
        with contextlib.suppress(FileExistsError):
            os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))


def _enter_root(rootfs: str) -> None:
    """pivot_root into ``rootfs``, and detach the old root. Where the old root is the
    initramfs (the guest agent's own root, which pivot_root refuses), move the rootfs
    over "/" and chroot instead, as ``runc --no-pivot`` does."""
    os.chdir(rootfs)
    try:
        sc.pivot_root(".", ".")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        sc.mount(rootfs, "/", None, sc.MS_MOVE)
        _detach_agent_mounts()
        os.chroot(".")
    else:
        sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def _detach_agent_mounts() -> None:
    """Without pivot_root the agent's mounts (/proc, /run with every container's rootfs...)
    stay in the container's namespace, hanging off the initramfs below its root, where a
    chroot escape would find them. Detach them all; the rootfs, moved over "/", stays."""
    with open("/proc/self/mountinfo") as mountinfo:
        entries = [line.split()[:5] for line in mountinfo]
    for entry in entries:  # the kernel writes a space as \040, a backslash as \134...
        entry[4] = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), entry[4])
    ids = {entry[0] for entry in entries}
    root_ids = {entry[0] for entry in entries if entry[1] == entry[0] or entry[1] not in ids}
    # Paths resolve from our root, still the initramfs: "/proc" is the agent's, not the rootfs's.
    paths = {entry[4] for entry in entries if entry[1] in root_ids and entry[4] != "/"}
    for path in sorted(
        paths, key=lambda p: (p == "/proc", p)
    ):  # /proc last: read above, needed by none after
        for _ in range(MAX_STACKED_MOUNTS):
            try:
                sc.umount2(path, sc.MNT_DETACH)
            except OSError:
                break


def _remount_readonly(path: str, recursive: bool = False) -> None:
    flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY
    kept = os.statvfs(path).f_flag & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    sc.mount(None, path, None, flags | kept | (sc.MS_REC if recursive else 0))


def build_container(container: ContainerSpec, console_socket: int | None = None) -> None:
    """Namespaces, mounts, devices, root (and the terminal, with ``console_socket``):
    everything the init child does as root."""
    sc.unshare(container.namespaces & ~(sc.CLONE_NEWPID | sc.CLONE_NEWUSER))
    sc.mount(None, "/", None, container.rootfs_propagation)
    rootfs = container.root_path
    if not os.path.isdir(rootfs):
        raise LaunchError(f"rootfs {rootfs} does not exist or is not a directory")
    sc.mount(rootfs, rootfs, None, sc.MS_BIND | sc.MS_REC)
    needs_devices = True
    for mount in container.mounts:
        _mount_one(rootfs, mount)
        if mount.destination.rstrip("/") == "/dev" and mount.is_bind:
            needs_devices = False
    if needs_devices:
        _create_devices(rootfs, container)
    _bind_sandbox_boot_id(rootfs)
    # As runc: a missing working directory is made (before a read-only root forbids it);
    # where it cannot be, the chdir later says why.
    with contextlib.suppress(OSError):
        os.makedirs(secure_join(rootfs, container.process.cwd), 0o755, exist_ok=True)
    _enter_root(rootfs)
    # As runc: once the container's own mounts are up, before anything is made read-only.
    if console_socket is not None:
        setup_terminal(console_socket, container.process.console_size, bind_console=True)

    if container.hostname is not None:
        sc.sethostname(container.hostname)
    if container.domainname is not None:
        _write("/proc/sys/kernel/domainname", container.domainname)
    for key, value in container.sysctl:
        _write("/proc/sys/" + key.replace(".", "/"), value)
    # In runc's order: read-only paths, then masked ones.
    for path in container.readonly_paths:
        if os.path.lexists(path):
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            _remount_readonly(path, recursive=True)
    for path in container.masked_paths:
        if os.path.isdir(path):
            sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY)
        elif os.path.lexists(path):
            sc.mount("/dev/null", path, None, sc.MS_BIND)
    if container.readonly_root:
        _remount_readonly("/")


def setup_terminal(console_socket: int, size: tuple[int, int] | None, *, bind_console: bool) -> None:
    """Make a pty from the devpts instance the container's /dev/ptmx leads to, so that
    the slave is /dev/pts/N in the container; make it stdio and the controlling terminal
    (setsid came first), bind it over /dev/console for init and send the master to the agent."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"cannot open the container's /dev/ptmx: {exc.strerror or exc}") from None
    slave = None
    try:
        fcntl.ioctl(master, sc.TIOCSPTLCK, struct.pack("i", 0))
        (number,) = struct.unpack("I", fcntl.ioctl(master, sc.TIOCGPTN, bytes(4)))
        slave = fcntl.ioctl(master, sc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if size is not None:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        if bind_console:
            _make_target("/dev/console", True)
            sc.mount(f"/dev/pts/{number}", "/dev/console", None, sc.MS_BIND)
        for target in (0, 1, 2):
            os.dup2(slave, target, inheritable=True)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        with socket.socket(fileno=console_socket) as channel:
            socket.send_fds(channel, [b"pty"], [master])
    except OSError as exc:
        raise LaunchError(f"cannot set up the terminal: {exc.strerror or exc}") from None
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as file:
            file.write(value)
    except OSError as exc:
        raise LaunchError(f"cannot write {path}: {exc.strerror or exc}") from None


# --- the process -------------------------------------------------------------------------


def environment(process: ProcessSpec) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in process.env:
        key, _, value = entry.partition("=")
        env[key] = value
    if "HOME" not in env:  # as runc: the user's home from /etc/passwd, else "/"
        env["HOME"] = home_of(process.user.uid)
    return env


def home_of(uid: int, passwd: str = "/etc/passwd") -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError), open(passwd) as file:
        for line in file:
            fields = line.rstrip("\n").split(":")
            if len(fields) >= 6 and fields[2] == str(uid) and fields[5]:
                return fields[5]
    return "/"


def look_path(name: str, env_path: str | None) -> str:
    """The program to exec, with Go's exec.LookPath errors, as runc reports them."""

    def executable(path: str) -> bool:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        return not stat.S_ISDIR(mode) and bool(mode & 0o111)

    if "/" in name:
        try:
            mode = os.stat(name).st_mode
        except OSError as exc:
            raise LaunchError(f'exec: "{name}": stat {name}: {os.strerror(exc.errno or 0).lower()}') from None
        if stat.S_ISDIR(mode) or not mode & 0o111:
            raise LaunchError(f'exec: "{name}": permission denied')
        return name
    for directory in (env_path or "").split(":") if env_path else []:
        candidate = os.path.join(directory or ".", name)
        if executable(candidate):
            return candidate
    raise LaunchError(f'exec: "{name}": executable file not found in $PATH')


def _capability_mask(numbers: frozenset[int]) -> int:
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            return int(file.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def prepare_process(process: ProcessSpec, enter_user_namespace: Callable[[], None] | None = None) -> str:
    """rlimits, the user namespace, user, capabilities, cwd; returns the program to exec."""
    for rlimit in process.rlimits:
        resource.setrlimit(rlimit.resource, (rlimit.soft, rlimit.hard))
    if process.oom_score_adj is not None:
        _write("/proc/self/oom_score_adj", str(process.oom_score_adj))
    # after the two above, which raising needs the guest root's CAP_SYS_RESOURCE for; before the
    # bounding set, which entering a user namespace fills again
    if enter_user_namespace is not None:
        enter_user_namespace()
    caps = process.capabilities
    last_cap = last_capability()
    if caps is not None:
        for number in range(last_cap + 1):
            if number not in caps.bounding:
                sc.prctl(sc.PR_CAPBSET_DROP, number)
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    user = process.user
    try:
        os.setgroups(list(user.additional_gids))
        os.setgid(user.gid)
        os.setuid(user.uid)
    except OSError as exc:
        unmapped = enter_user_namespace is not None and exc.errno == errno.EINVAL
        raise LaunchError(f"cannot switch to user {user.uid}:{user.gid}: {exc.strerror or exc}"
                          + (" (not mapped in the user namespace)" if unmapped else "")) from None
    if caps is not None:
        sc.prctl(sc.PR_SET_KEEPCAPS, 0)
        valid = frozenset(range(last_cap + 1))
        sc.capset(
            _capability_mask(caps.effective & valid),
            _capability_mask(caps.permitted & valid),
            _capability_mask(caps.inheritable & valid),
        )
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
        # The kernel refuses ambient capabilities missing from permitted or inheritable;
        # runc goes on without them, and so do we.
        for number in sorted(caps.ambient & caps.permitted & caps.inheritable & valid):
            sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, number)
    os.umask(DEFAULT_UMASK if user.umask is None else user.umask)
    try:
        os.chdir(process.cwd)
    except OSError as exc:
        raise LaunchError(
            f"cannot change to the working directory {process.cwd}: {exc.strerror or exc}"
        ) from None
    return look_path(process.args[0], environment(process).get("PATH"))
