"""The OCI runtime spec (config.json) as the guest applies it: parsed, bounded, validated.

Unknown properties are ignored, as the OCI spec requires; known fields the guest cannot
honour (seccomp, hooks, idmapped mounts, SELinux/AppArmor labels...) are refused with a
SpecError naming the field, never silently dropped. The host runtime runs the hooks and
strips what its configuration says the guest should not apply.
"""

from __future__ import annotations

import itertools
import json
import re
import resource
from dataclasses import dataclass, field
from typing import Any

from kabuto.guest.containers import syscalls as sc

MAX_SPEC_BYTES = 1 << 20
MAX_ID_LENGTH = 128
MAX_PATH_LENGTH = 4096
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STRING = 128 * 1024
MAX_MOUNTS = 256
MAX_GROUPS = 256
MAX_LIST = 256
MAX_HOSTNAME = 64  # HOST_NAME_MAX
MAX_ID_MAPPINGS = 340  # the kernel's limits on a uid_map or gid_map: lines, and bytes in its one write
MAX_ID_MAP_BYTES = 4096
MAX_ID = 0xFFFFFFFF

# As runc: letters, digits and _ + - . (not starting with a dot, which "." and ".." would).
ID_PATTERN = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_+\-.]*")

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip
CAPABILITY_NUMBERS = {name: number for number, name in enumerate(CAPABILITIES)}

# Linux's RLIMIT_* numbers (Python's resource module lacks some of them).
RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}  # fmt: skip

# mount(8) option -> (flags to set, flags to clear)
MOUNT_FLAGS = {
    "async": (0, sc.MS_SYNCHRONOUS),
    "atime": (0, sc.MS_NOATIME),
    "bind": (sc.MS_BIND, 0),
    "defaults": (0, 0),
    "dev": (0, sc.MS_NODEV),
    "diratime": (0, sc.MS_NODIRATIME),
    "dirsync": (sc.MS_DIRSYNC, 0),
    "exec": (0, sc.MS_NOEXEC),
    "mand": (sc.MS_MANDLOCK, 0),
    "noatime": (sc.MS_NOATIME, 0),
    "nodev": (sc.MS_NODEV, 0),
    "nodiratime": (sc.MS_NODIRATIME, 0),
    "noexec": (sc.MS_NOEXEC, 0),
    "nomand": (0, sc.MS_MANDLOCK),
    "norelatime": (0, sc.MS_RELATIME),
    "nostrictatime": (0, sc.MS_STRICTATIME),
    "nosuid": (sc.MS_NOSUID, 0),
    "nosymfollow": (sc.MS_NOSYMFOLLOW, 0),
    "rbind": (sc.MS_BIND | sc.MS_REC, 0),
    "relatime": (sc.MS_RELATIME, 0),
    "ro": (sc.MS_RDONLY, 0),
    "rw": (0, sc.MS_RDONLY),
    "strictatime": (sc.MS_STRICTATIME, 0),
    "suid": (0, sc.MS_NOSUID),
    "sync": (sc.MS_SYNCHRONOUS, 0),
}
PROPAGATION_FLAGS = {
    "private": sc.MS_PRIVATE,
    "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED,
    "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE,
    "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE,
    "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}
MOUNT_TYPES = {"bind", "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
NAMESPACE_FLAGS = {
    "pid": sc.CLONE_NEWPID,
    "mount": sc.CLONE_NEWNS,
    "ipc": sc.CLONE_NEWIPC,
    "uts": sc.CLONE_NEWUTS,
    "cgroup": sc.CLONE_NEWCGROUP,
    "user": sc.CLONE_NEWUSER,
}
DEVICE_TYPES = {"c", "u", "b", "p"}
# What the host sends for "share this namespace with the pod's sandbox container": the
# namespace of that container's init in the guest.
JOINABLE_NAMESPACES = ("ipc", "uts", "pid")
CONTAINER_PATH_PREFIX = "container:"


class SpecError(ValueError):
    """The OCI configuration cannot be applied; the message names the field."""


@dataclass(frozen=True)
class Rlimit:
    resource: int
    soft: int
    hard: int


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    umask: int | None = None


@dataclass(frozen=True)
class Capabilities:
    bounding: frozenset[int] = frozenset()
    effective: frozenset[int] = frozenset()
    inheritable: frozenset[int] = frozenset()
    permitted: frozenset[int] = frozenset()
    ambient: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    user: User = field(default_factory=User)
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # rows, cols
    rlimits: tuple[Rlimit, ...] = ()
    no_new_privileges: bool = False
    capabilities: Capabilities | None = None  # None: keep the agent's
    oom_score_adj: int | None = None

    def env_value(self, name: str) -> str | None:
        for entry in reversed(self.env):
            key, sep, value = entry.partition("=")
            if sep and key == name:
                return value
        return None


@dataclass(frozen=True)
class MountSpec:
    destination: str
    type: str
    source: str
    flags: int
    propagation: int
    data: str

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & sc.MS_BIND)


@dataclass(frozen=True)
class DeviceSpec:
    path: str
    type: str
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class IdMapping:
    """One line of a uid_map or gid_map: ``size`` ids from ``container_id`` are ``host_id``... in
    the guest's initial user namespace."""

    container_id: int
    host_id: int
    size: int

    def line(self) -> str:
        return f"{self.container_id} {self.host_id} {self.size}\n"


@dataclass(frozen=True)
class Resources:
    """cgroup v2 files to write (name -> value), from linux.resources."""

    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    root_path: str
    readonly_root: bool
    process: ProcessSpec
    hostname: str | None = None
    domainname: str | None = None
    mounts: tuple[MountSpec, ...] = ()
    namespaces: int = sc.CLONE_NEWNS  # CLONE_NEW* flags the container gets of its own
    joined: tuple[tuple[int, str], ...] = ()  # (CLONE_NEW* flag, container id): that container's

    @property
    def entered(self) -> int:
        """The CLONE_NEW* flags of every namespace not the guest's: what an exec joins."""
        flags = self.namespaces
        for flag, _ in self.joined:
            flags |= flag
        return flags
    devices: tuple[DeviceSpec, ...] = ()
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    rootfs_propagation: int = sc.MS_PRIVATE | sc.MS_REC
    resources: Resources = field(default_factory=Resources)
    # with CLONE_NEWUSER in namespaces: the container's ids as the guest's kernel maps them
    uid_mappings: tuple[IdMapping, ...] = ()
    gid_mappings: tuple[IdMapping, ...] = ()


# --- small checked accessors -------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be an object")
    return value


def _list(value: Any, where: str, limit: int = MAX_LIST) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"{where} must be an array")
    if len(value) > limit:
        raise SpecError(f"{where} has {len(value)} entries; at most {limit} are accepted")
    return value


def _string(value: Any, where: str, limit: int = MAX_STRING, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where} must be a string")
    if len(value) > limit:
        raise SpecError(f"{where} is longer than {limit} characters")
    if "\0" in value:
        raise SpecError(f"{where} contains a NUL character")
    if not allow_empty and not value:
        raise SpecError(f"{where} must not be empty")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where} must be an integer")
    if not low <= value <= high:
        raise SpecError(f"{where} = {value} is out of range [{low}, {high}]")
    return value


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SpecError(f"{where} must be true or false")
    return value


def absolute_path(value: Any, where: str) -> str:
    path = _string(value, where, MAX_PATH_LENGTH, allow_empty=False)
    if not path.startswith("/"):
        raise SpecError(f"{where} = {path!r} must be an absolute path")
    return path


def _refuse(section: dict[str, Any], key: str, where: str, why: str) -> None:
    value = section.get(key)
    if value not in (None, "", [], {}):
        raise SpecError(f"{where}.{key} is not supported in the guest: {why}")


def check_id(value: str, what: str) -> str:
    if not value:
        raise SpecError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH or not ID_PATTERN.fullmatch(value):
        raise SpecError(
            f"invalid {what} {value[:MAX_ID_LENGTH]!r}: use up to {MAX_ID_LENGTH} letters, digits, _ + - ."
        )
    return value


# --- process -------------------------------------------------------------------------


def _capability_set(value: Any, where: str) -> frozenset[int]:
    numbers = set()
    for index, name in enumerate(_list(value, where, len(CAPABILITIES) * 2)):
        name = _string(name, f"{where}[{index}]", 64)
        if name not in CAPABILITY_NUMBERS:
            raise SpecError(f"{where}[{index}]: unknown capability {name!r}")
        numbers.add(CAPABILITY_NUMBERS[name])
    return frozenset(numbers)


def parse_process(process: Any, where: str = "process") -> ProcessSpec:
    process = _object(process, where)
    for key, why in (
        ("commandLine", "it is for Windows"),
        ("apparmorProfile", "no AppArmor in the guest"),
        ("selinuxLabel", "no SELinux in the guest"),
        ("ioPriority", "not implemented"),
        ("scheduler", "not implemented"),
        ("execCPUAffinity", "not implemented"),
    ):
        _refuse(process, key, where, why)

    args = tuple(
        _string(arg, f"{where}.args[{i}]")
        for i, arg in enumerate(_list(process.get("args"), f"{where}.args", MAX_ARGS))
    )
    if not args or not args[0]:
        raise SpecError(f"{where}.args must name the program to run")
    env = tuple(
        _string(entry, f"{where}.env[{i}]")
        for i, entry in enumerate(_list(process.get("env"), f"{where}.env", MAX_ENV))
    )
    for i, entry in enumerate(env):
        if not entry.partition("=")[0] or "=" not in entry:
            raise SpecError(f"{where}.env[{i}] = {entry[:64]!r} is not NAME=VALUE")
    if sum(len(a) + 1 for a in args) + sum(len(e) + 1 for e in env) > 2 * MAX_STRING * 8:
        raise SpecError(f"{where}.args and env are too large together")
    cwd = absolute_path(process.get("cwd", "/"), f"{where}.cwd")

    user_object = _object(process.get("user"), f"{where}.user")
    _refuse(user_object, "username", f"{where}.user", "it is for Windows")
    umask = user_object.get("umask")
    user = User(
        uid=_int(user_object.get("uid", 0), f"{where}.user.uid", 0, 0xFFFFFFFE),
        gid=_int(user_object.get("gid", 0), f"{where}.user.gid", 0, 0xFFFFFFFE),
        additional_gids=tuple(
            _int(g, f"{where}.user.additionalGids[{i}]", 0, 0xFFFFFFFE)
            for i, g in enumerate(
                _list(user_object.get("additionalGids"), f"{where}.user.additionalGids", MAX_GROUPS)
            )
        ),
        umask=None if umask is None else _int(umask, f"{where}.user.umask", 0, 0o777),
    )

    console = _object(process.get("consoleSize"), f"{where}.consoleSize")
    console_size = None
    if console:
        console_size = (
            _int(console.get("height", 0), f"{where}.consoleSize.height", 0, 0xFFFF),
            _int(console.get("width", 0), f"{where}.consoleSize.width", 0, 0xFFFF),
        )

    rlimits = []
    seen = set()
    for i, item in enumerate(_list(process.get("rlimits"), f"{where}.rlimits", len(RLIMITS))):
        item = _object(item, f"{where}.rlimits[{i}]")
        name = _string(item.get("type"), f"{where}.rlimits[{i}].type", 32)
        if name not in RLIMITS:
            raise SpecError(f"{where}.rlimits[{i}].type: unknown rlimit {name!r}")
        if name in seen:
            raise SpecError(f"{where}.rlimits: {name} appears twice")
        seen.add(name)
        soft = _int(item.get("soft"), f"{where}.rlimits[{i}].soft", 0, 2**64 - 1)
        hard = _int(item.get("hard"), f"{where}.rlimits[{i}].hard", 0, 2**64 - 1)
        if soft > hard:
            raise SpecError(f"{where}.rlimits[{i}]: soft limit {soft} exceeds hard limit {hard}")
        # The kernel's RLIM_INFINITY is all ones, which Python's resource module spells -1
        # and which no finite limit past 2**63 differs from in practice.
        as_python = [resource.RLIM_INFINITY if v >= 2**63 else v for v in (soft, hard)]
        rlimits.append(Rlimit(RLIMITS[name], as_python[0], as_python[1]))

    capabilities = None
    if (caps := process.get("capabilities")) is not None:
        caps = _object(caps, f"{where}.capabilities")
        capabilities = Capabilities(
            **{
                key: _capability_set(caps.get(key), f"{where}.capabilities.{key}")
                for key in ("bounding", "effective", "inheritable", "permitted", "ambient")
            }
        )

    oom = process.get("oomScoreAdj")
    return ProcessSpec(
        args=args,
        env=env,
        cwd=cwd,
        user=user,
        terminal=_bool(process.get("terminal"), f"{where}.terminal"),
        console_size=console_size,
        rlimits=tuple(rlimits),
        no_new_privileges=_bool(process.get("noNewPrivileges"), f"{where}.noNewPrivileges"),
        capabilities=capabilities,
        oom_score_adj=None if oom is None else _int(oom, f"{where}.oomScoreAdj", -1000, 1000),
    )


def parse_process_json(raw: bytes) -> ProcessSpec:
    return parse_process(_load_json(raw, "process"))


# --- mounts, devices, resources --------------------------------------------------------


def parse_mount_options(options: list[str], where: str) -> tuple[int, int, str]:
    """mount(8)-style options -> (flags, propagation flags, data)."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for i, option in enumerate(options):
        option = _string(option, f"{where}[{i}]", 1024)
        if option in MOUNT_FLAGS:
            set_flags, clear_flags = MOUNT_FLAGS[option]
            flags = (flags | set_flags) & ~clear_flags
        elif option in PROPAGATION_FLAGS:
            propagation = PROPAGATION_FLAGS[option]
        elif option:
            if "," in option:
                raise SpecError(f"{where}[{i}] = {option!r}: give one option per entry")
            data.append(option)
    return flags, propagation, ",".join(data)


def _parse_mount(item: Any, where: str) -> MountSpec:
    item = _object(item, where)
    destination = absolute_path(item.get("destination"), f"{where}.destination")
    for key in ("uidMappings", "gidMappings"):
        _refuse(item, key, where, "no idmapped mounts in the guest")
    flags, propagation, data = parse_mount_options(
        _list(item.get("options"), f"{where}.options", 64), f"{where}.options"
    )
    mount_type = _string(item.get("type") or ("bind" if flags & sc.MS_BIND else ""), f"{where}.type", 32)
    if mount_type == "none" and flags & sc.MS_BIND:
        mount_type = "bind"
    if mount_type not in MOUNT_TYPES:
        raise SpecError(
            f"{where}: mount type {mount_type or '(none)'!r} is not supported in the guest "
            f"(supported: {', '.join(sorted(MOUNT_TYPES))})"
        )
    if mount_type == "bind":
        flags |= sc.MS_BIND
        source = absolute_path(item.get("source"), f"{where}.source")
    else:
        source = _string(item.get("source") or mount_type, f"{where}.source", MAX_PATH_LENGTH)
    return MountSpec(destination, mount_type, source, flags, propagation, data)


def _parse_device(item: Any, where: str) -> DeviceSpec:
    item = _object(item, where)
    device_type = _string(item.get("type"), f"{where}.type", 1)
    if device_type not in DEVICE_TYPES:
        raise SpecError(f"{where}.type = {device_type!r}: expected one of c, u, b, p")
    return DeviceSpec(
        path=absolute_path(item.get("path"), f"{where}.path"),
        type=device_type,
        major=_int(item.get("major", 0), f"{where}.major", 0, 0xFFFFFFFF),
        minor=_int(item.get("minor", 0), f"{where}.minor", 0, 0xFFFFFFFF),
        mode=_int(item.get("fileMode", 0o666), f"{where}.fileMode", 0, 0o7777),
        uid=_int(item.get("uid", 0), f"{where}.uid", 0, 0xFFFFFFFE),
        gid=_int(item.get("gid", 0), f"{where}.gid", 0, 0xFFFFFFFE),
    )


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] -> v2 cpu.weight [1, 10000], as runc converts."""
    return 1 + ((shares - 2) * 9999) // 262142


def parse_resources(resources: Any, where: str = "linux.resources") -> Resources:
    resources = _object(resources, where)
    for key in ("blockIO", "hugepageLimits", "network", "rdma"):
        _refuse(resources, key, where, "not implemented")
    # Device rules need no cgroup here: the container's /dev holds only the nodes made for it.
    for i, rule in enumerate(_list(resources.get("devices"), f"{where}.devices", MAX_LIST)):
        _object(rule, f"{where}.devices[{i}]")
    files: dict[str, str] = {}

    memory = _object(resources.get("memory"), f"{where}.memory")
    for key in ("kernel", "kernelTCP", "swappiness"):
        _refuse(memory, key, f"{where}.memory", "cgroup v2 has no such limit")
    limit = memory.get("limit")
    if limit is not None and limit != -1:
        files["memory.max"] = str(_int(limit, f"{where}.memory.limit", 1, 2**63 - 1))
    if (reservation := memory.get("reservation")) is not None and reservation != -1:
        files["memory.low"] = str(_int(reservation, f"{where}.memory.reservation", 0, 2**63 - 1))
    if (swap := memory.get("swap")) is not None and swap != -1:
        swap = _int(swap, f"{where}.memory.swap", 0, 2**63 - 1)
        if limit is None or limit == -1 or swap < limit:
            raise SpecError(f"{where}.memory.swap needs a memory.limit no larger than it")
        files["memory.swap.max"] = str(swap - limit)  # v1 counts memory+swap, v2 swap alone
    if _bool(memory.get("disableOOMKiller"), f"{where}.memory.disableOOMKiller"):
        raise SpecError(f"{where}.memory.disableOOMKiller is not supported by cgroup v2")

    cpu = _object(resources.get("cpu"), f"{where}.cpu")
    for key in ("realtimeRuntime", "realtimePeriod", "idle"):
        _refuse(cpu, key, f"{where}.cpu", "not implemented")
    if (shares := cpu.get("shares")) is not None and shares != 0:
        files["cpu.weight"] = str(shares_to_weight(_int(shares, f"{where}.cpu.shares", 2, 262144)))
    quota, period = cpu.get("quota"), cpu.get("period")
    if quota is not None or period is not None:
        quota_text = (
            "max" if quota in (None, -1, 0) else str(_int(quota, f"{where}.cpu.quota", 1000, 2**63 - 1))
        )
        period_value = _int(period if period is not None else 100000, f"{where}.cpu.period", 1000, 1000000)
        files["cpu.max"] = f"{quota_text} {period_value}"
    if cpu.get("cpus"):
        files["cpuset.cpus"] = _string(cpu["cpus"], f"{where}.cpu.cpus", 256)
    if cpu.get("mems"):
        files["cpuset.mems"] = _string(cpu["mems"], f"{where}.cpu.mems", 256)

    pids = _object(resources.get("pids"), f"{where}.pids")
    if (pids_limit := pids.get("limit")) is not None and pids_limit > 0:
        files["pids.max"] = str(_int(pids_limit, f"{where}.pids.limit", 1, 2**31))

    for name, value in _object(resources.get("unified"), f"{where}.unified").items():
        if not re.fullmatch(r"[a-z_]+\.[a-z_.]+", name) or name.startswith("cgroup."):
            raise SpecError(f"{where}.unified: {name[:64]!r} is not a controller file")
        files[name] = _string(value, f"{where}.unified.{name}", 4096)
    return Resources(tuple(files.items()))


# --- the whole configuration -------------------------------------------------------------


def _load_json(raw: bytes, what: str) -> Any:
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"the {what} JSON is {len(raw)} bytes; at most {MAX_SPEC_BYTES} are accepted")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"the {what} JSON is invalid: {exc}") from None


def _parse_id_mappings(value: Any, where: str) -> tuple[IdMapping, ...]:
    mappings = []
    for i, item in enumerate(_list(value, where, MAX_ID_MAPPINGS)):
        item = _object(item, f"{where}[{i}]")
        mapping = IdMapping(
            container_id=_int(item.get("containerID"), f"{where}[{i}].containerID", 0, MAX_ID),
            host_id=_int(item.get("hostID"), f"{where}[{i}].hostID", 0, MAX_ID),
            size=_int(item.get("size"), f"{where}[{i}].size", 1, MAX_ID),
        )
        for first, side in ((mapping.container_id, "containerID"), (mapping.host_id, "hostID")):
            if first + mapping.size > MAX_ID + 1:
                raise SpecError(f"{where}[{i}]: {side} {first} + size {mapping.size} passes id {MAX_ID}")
        mappings.append(mapping)
    written = sum(len(m.line()) for m in mappings)
    if written >= MAX_ID_MAP_BYTES:
        raise SpecError(f"{where}: {written} bytes as a map; the kernel takes fewer than {MAX_ID_MAP_BYTES}")
    # the kernel refuses overlapping ranges on either side with a bare EINVAL
    for side in ("container_id", "host_id"):
        ranges = sorted((getattr(m, side), getattr(m, side) + m.size, i) for i, m in enumerate(mappings))
        for (_, end, a), (start, _, b) in itertools.pairwise(ranges):
            if start < end:
                raise SpecError(f"{where}[{min(a, b)}] and [{max(a, b)}] overlap")
    return tuple(mappings)


def _mapped(ident: int, mappings: tuple[IdMapping, ...]) -> bool:
    return any(m.container_id <= ident < m.container_id + m.size for m in mappings)


def _check_user_namespace(namespaces: int, process: ProcessSpec, uid_mappings: tuple[IdMapping, ...],
                          gid_mappings: tuple[IdMapping, ...]) -> None:
    if not namespaces & sc.CLONE_NEWUSER:
        if uid_mappings or gid_mappings:
            raise SpecError("linux.uidMappings and linux.gidMappings need a user namespace of the "
                            "container's own (linux.namespaces: user)")
        return
    if not uid_mappings or not gid_mappings:
        raise SpecError("linux.namespaces: a user namespace needs linux.uidMappings and linux.gidMappings")
    user = process.user
    if not _mapped(user.uid, uid_mappings):
        raise SpecError(f"process.user.uid {user.uid} is not mapped by linux.uidMappings")
    for what, gid in (("gid", user.gid), *(("additionalGids", g) for g in user.additional_gids)):
        if not _mapped(gid, gid_mappings):
            raise SpecError(f"process.user.{what} {gid} is not mapped by linux.gidMappings")


def parse_spec(raw: bytes) -> ContainerSpec:
    config = _object(_load_json(raw, "OCI config"), "config.json")
    if "hooks" in config:
        _refuse(config, "hooks", "config", "hooks run on the host, in the runtime")
    root = _object(config.get("root"), "root")
    root_path = absolute_path(root.get("path"), "root.path (the rootfs's path in the guest)")
    if "process" not in config:
        raise SpecError("process is missing: nothing to run")
    process = parse_process(config["process"])

    linux = _object(config.get("linux"), "linux")
    for key, why in (
        ("seccomp", "no seccomp filter in the guest"),
        ("mountLabel", "no SELinux in the guest"),
        ("intelRdt", "no Intel RDT in the guest"),
        ("personality", "not implemented"),
        ("timeOffsets", "no time namespace in the guest"),
    ):
        _refuse(linux, key, "linux", why)

    namespaces = sc.CLONE_NEWNS  # always: pivot_root needs a mount namespace of its own
    joined: list[tuple[int, str]] = []
    for i, item in enumerate(_list(linux.get("namespaces"), "linux.namespaces", 16)):
        item = _object(item, f"linux.namespaces[{i}]")
        ns_type = _string(item.get("type"), f"linux.namespaces[{i}].type", 16)
        if ns_type == "network":
            # As Kata's agent: the VM is the pod, so every container of the sandbox shares the
            # guest's network namespace (the pod's interfaces and lo), whatever host path it names.
            continue
        if ns_type not in NAMESPACE_FLAGS:
            raise SpecError(
                f"linux.namespaces[{i}]: namespace type {ns_type!r} is not supported in the guest"
            )
        path = item.get("path")
        if path:
            path = _string(path, f"linux.namespaces[{i}].path", MAX_PATH_LENGTH)
            if ns_type not in JOINABLE_NAMESPACES or not path.startswith(CONTAINER_PATH_PREFIX):
                raise SpecError(
                    f"linux.namespaces[{i}]: joining a namespace by path ({ns_type}) is not supported"
                    f" (only {CONTAINER_PATH_PREFIX}<id> for {', '.join(JOINABLE_NAMESPACES)})"
                )
            target = check_id(path.removeprefix(CONTAINER_PATH_PREFIX), f"linux.namespaces[{i}].path's id")
            joined.append((NAMESPACE_FLAGS[ns_type], target))
            continue
        namespaces |= NAMESPACE_FLAGS[ns_type]

    uid_mappings = _parse_id_mappings(linux.get("uidMappings"), "linux.uidMappings")
    gid_mappings = _parse_id_mappings(linux.get("gidMappings"), "linux.gidMappings")
    _check_user_namespace(namespaces, process, uid_mappings, gid_mappings)

    joined_flags = [flag for flag, _ in joined]
    if len(set(joined_flags)) < len(joined_flags) or any(flag & namespaces for flag in joined_flags):
        raise SpecError("linux.namespaces: a namespace type is both joined and new, or joined twice")
    # as runc: a joined UTS namespace takes the hostname too (it is the sandbox's)
    own_uts = bool(namespaces & sc.CLONE_NEWUTS) or any(flag == sc.CLONE_NEWUTS for flag, _ in joined)
    hostname = config.get("hostname")
    if hostname is not None:
        hostname = _string(hostname, "hostname", MAX_HOSTNAME)
        if hostname and not own_uts:
            raise SpecError("hostname needs a private UTS namespace (linux.namespaces: uts)")
    domainname = config.get("domainname")
    if domainname is not None:
        domainname = _string(domainname, "domainname", MAX_HOSTNAME)
        if domainname and not own_uts:
            raise SpecError("domainname needs a private UTS namespace (linux.namespaces: uts)")

    mounts = tuple(
        _parse_mount(item, f"mounts[{i}]")
        for i, item in enumerate(_list(config.get("mounts"), "mounts", MAX_MOUNTS))
    )
    devices = tuple(
        _parse_device(item, f"linux.devices[{i}]")
        for i, item in enumerate(_list(linux.get("devices"), "linux.devices"))
    )
    sysctl = []
    for key, value in _object(linux.get("sysctl"), "linux.sysctl").items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key) or ".." in key:
            raise SpecError(f"linux.sysctl: {key[:64]!r} is not a sysctl name")
        sysctl.append((key, _string(value, f"linux.sysctl.{key}", 4096)))
    propagation = sc.MS_PRIVATE | sc.MS_REC
    if linux.get("rootfsPropagation"):
        name = _string(linux["rootfsPropagation"], "linux.rootfsPropagation", 16)
        if name not in PROPAGATION_FLAGS:
            raise SpecError(f"linux.rootfsPropagation = {name!r} is not a propagation mode")
        propagation = PROPAGATION_FLAGS[name]

    return ContainerSpec(
        root_path=root_path,
        readonly_root=_bool(root.get("readonly"), "root.readonly"),
        process=process,
        hostname=hostname or None,
        domainname=domainname or None,
        mounts=mounts,
        namespaces=namespaces,
        joined=tuple(joined),
        devices=devices,
        masked_paths=tuple(
            absolute_path(p, f"linux.maskedPaths[{i}]")
            for i, p in enumerate(_list(linux.get("maskedPaths"), "linux.maskedPaths"))
        ),
        readonly_paths=tuple(
            absolute_path(p, f"linux.readonlyPaths[{i}]")
            for i, p in enumerate(_list(linux.get("readonlyPaths"), "linux.readonlyPaths"))
        ),
        sysctl=tuple(sysctl),
        rootfs_propagation=propagation,
        resources=parse_resources(linux.get("resources")),
        uid_mappings=uid_mappings,
        gid_mappings=gid_mappings,
    )
