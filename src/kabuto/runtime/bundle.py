"""OCI bundles: read and check ``config.json`` the way runc does, and generate one like ``runc spec``.

Everything here runs before a VM exists, so bad input costs nothing to refuse. Fields that only
make sense on the host (hooks, seccomp through the host kernel, joining most host namespaces by
path) are refused by name rather than silently dropped. A user namespace is the guest's: its
mappings map the container's ids to the guest kernel's, not the host's. Namespace paths are
honoured as Kata honours them: a network namespace path is the sandbox's (its VMM and taps live
there; in the guest every container shares the pod's network namespace), and an ipc/uts/pid path
naming the pod's sandbox task (CRI hands over ``/proc/<its pid>/ns/<type>``, and that pid is the
VMM's) means sharing that namespace with the sandbox container inside the guest.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kabuto.bounded import FileTooLarge, read_bounded
from kabuto.errors import KabutoError

CONFIG_FILE = "config.json"
# config.json is read into memory whole: bound it (runc's specs are a few KiB).
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Container ids end up in paths, socket names and the VM id: keep them short and path-safe.
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")

RLIMITS = frozenset({
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS",
    "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
})
NAMESPACES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})
#: the namespace types whose path a VM can honour (see the module's docstring)
JOINABLE_NAMESPACES = ("network", "ipc", "uts", "pid")
#: how the guest agent names "the namespace of container <id>" in a spec's namespace path
GUEST_CONTAINER_NAMESPACE = "container:{}"
# Sections for other platforms, and Linux features that need the host kernel or host state.
UNSUPPORTED_TOP = ("solaris", "windows", "vm", "zos")
UNSUPPORTED_LINUX = ("intelRdt", "personality", "timeOffsets")
ID_MAPPINGS = ("uidMappings", "gidMappings")
# Bind sources the guest serves itself, as Kata does: its own /proc and /sys, and its own device
# nodes (a host device node means nothing in the VM); a regular file under /dev is still shared.
GUEST_SOURCE_ROOTS = ("/proc", "/sys", "/dev")


class BundleError(KabutoError):
    """The OCI bundle or its config.json cannot be used; the message names what and why."""


class ContainerIdError(KabutoError):
    """A container id is malformed, already in use, or unknown."""


class ContainerExistsError(ContainerIdError):
    """The container id is already in use under this state root."""


def check_container_id(container_id: str) -> str:
    if not CONTAINER_ID.fullmatch(container_id):
        raise ContainerIdError(
            f"invalid container id {container_id!r}: use 1-64 characters of letters, digits, "
            "'_', '.', '+', '-', starting with a letter or digit")
    return container_id


@dataclass(frozen=True)
class HostBind:
    """A bind mount of a host path: shared with the guest, never looked up inside it."""

    index: int  # position in config.json's mounts
    destination: str
    source: Path  # absolute host path
    readonly: bool
    recursive: bool


def is_bind_mount(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def _guest_provided(source: str) -> bool:
    under = [root for root in GUEST_SOURCE_ROOTS if source == root or source.startswith(root + "/")]
    return bool(under) and not (under[0] == "/dev" and os.path.isfile(source))


#: what containerd's CRI plugin annotates a container with: "sandbox" (the pod's own, pause) or
#: "container" (one that joins the pod named by SANDBOX_ID_ANNOTATION)
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"


@dataclass
class Bundle:
    """A checked bundle: its directory, the parsed spec and the absolute rootfs path."""

    path: Path
    spec: dict[str, Any]
    rootfs: Path

    @property
    def readonly_root(self) -> bool:
        return bool(self.spec.get("root", {}).get("readonly", False))

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.spec.get("annotations") or {})

    @property
    def namespace_paths(self) -> dict[str, str]:
        """Namespace type -> the host path the spec joins (checked by check_spec)."""
        namespaces = self.spec.get("linux", {}).get("namespaces") or []
        return {ns["type"]: ns["path"] for ns in namespaces if ns.get("path")}

    @property
    def network_namespace(self) -> str | None:
        """The host network namespace this container's sandbox lives in (CNI's, CRI's, podman's)."""
        return self.namespace_paths.get("network")

    @property
    def pod_sandbox_id(self) -> str | None:
        """The sandbox this container joins, as CRI annotates it; None for a sandbox of its own."""
        annotations = self.annotations
        if annotations.get(CONTAINER_TYPE_ANNOTATION) == "container":
            return annotations.get(SANDBOX_ID_ANNOTATION) or None
        return None

    @property
    def hostname(self) -> str:
        return str(self.spec.get("hostname") or "")

    def host_binds(self) -> list[HostBind]:
        """The bind mounts whose source is a host path (relative sources are relative to the
        bundle, as in runc). BundleError names the first whose source does not exist."""
        binds: list[HostBind] = []
        for index, mount in enumerate(self.spec.get("mounts") or []):
            if not is_bind_mount(mount):
                continue
            source = os.path.normpath(os.path.join(self.path, mount["source"]))
            if _guest_provided(source):
                continue
            if not os.path.exists(source):
                raise BundleError(f"{self.path / CONFIG_FILE}: mounts[{index}] ({mount['destination']}): "
                                  f"bind source {source} does not exist on the host")
            readonly = False
            for option in mount.get("options") or []:
                readonly = True if option == "ro" else False if option == "rw" else readonly
            binds.append(HostBind(index, mount["destination"], Path(source), readonly,
                                  "rbind" in (mount.get("options") or [])))
        return binds

    def guest_spec(self, guest_rootfs: str, bind_sources: dict[int, str] | None = None,
                   joined: dict[str, str] | None = None) -> dict[str, Any]:
        """The spec the guest agent gets: the root is wherever the rootfs storage is mounted, each
        shared host bind (by its index in ``mounts``) has its guest path as source, the network
        namespace is the guest's (the pod's), and an ipc/uts/pid path is the guest container
        ``joined`` names for that type (the caller checked the path names the pod's sandbox)."""
        spec = copy.deepcopy(self.spec)
        for namespace in spec.get("linux", {}).get("namespaces") or []:
            if not namespace.get("path"):
                continue
            if namespace["type"] == "network":
                del namespace["path"]
            else:
                namespace["path"] = GUEST_CONTAINER_NAMESPACE.format((joined or {})[namespace["type"]])
        spec["root"] = {**spec.get("root", {}), "path": guest_rootfs}
        for index, guest_source in (bind_sources or {}).items():
            spec["mounts"][index].update(type="bind", source=guest_source)
        # host cgroup placement means nothing inside the VM; a seccomp profile reaches no further
        # than here (the sandbox refuses it unless the configuration says to run without it)
        spec.get("linux", {}).pop("cgroupsPath", None)
        spec.get("linux", {}).pop("seccomp", None)
        return spec


def load_bundle(directory: str | Path) -> Bundle:
    """Read ``DIR/config.json`` and check it; raise BundleError naming the first problem."""
    bundle_dir = Path(directory).absolute()
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist or is not a directory")
    config = bundle_dir / CONFIG_FILE
    try:
        raw = read_bounded(config, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise BundleError(f"JSON specification file {CONFIG_FILE} not found in {bundle_dir}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {config}: {exc.strerror}") from None
    except FileTooLarge as exc:
        raise BundleError(f"{config} is {exc}") from None
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{config} is not valid JSON: {exc}") from None
    check_spec(spec, str(config))
    rootfs = Path(spec["root"]["path"])
    if not rootfs.is_absolute():
        rootfs = bundle_dir / rootfs
    if not rootfs.is_dir():
        raise BundleError(f"rootfs ({rootfs}) does not exist or is not a directory")
    bundle = Bundle(bundle_dir, spec, rootfs)
    bundle.host_binds()  # a missing bind source is refused before anything is made
    return bundle


def _fail(where: str, key: str, reason: str) -> BundleError:
    return BundleError(f"{where}: {key}: {reason}")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, key: str, what: str) -> Any:
    # bool is an int in Python; JSON true is never a valid uid or limit
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise _fail(where, key, f"must be {what}, got {json.dumps(value)[:80]}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_spec(spec: Any, where: str = CONFIG_FILE) -> None:
    """Raise BundleError for anything runc would refuse or Kabuto cannot honour in a VM."""
    _expect(spec, dict, where, "(top level)", "a JSON object")
    version = _expect(spec.get("ociVersion"), str, where, "ociVersion", "a string such as \"1.0.2\"")
    if not version.startswith("1."):
        raise _fail(where, "ociVersion", f"unsupported version {version!r} (1.x is supported)")
    for key in UNSUPPORTED_TOP:
        if spec.get(key) is not None:
            raise _fail(where, key, "not supported: Kabuto runs Linux containers")
    hooks = _expect(spec.get("hooks") or {}, dict, where, "hooks", "an object of hook lists")
    if any(hooks.values()):
        raise _fail(where, "hooks", "not supported: hooks would run on the host, outside the VM")
    root = _expect(spec.get("root"), dict, where, "root", "an object with a path")
    path = _expect(root.get("path"), str, where, "root.path", "a non-empty string")
    if not path:
        raise _fail(where, "root.path", "must not be empty")
    _expect(root.get("readonly", False), bool, where, "root.readonly", "true or false")
    _expect(spec.get("hostname", ""), str, where, "hostname", "a string")
    _check_process(_expect(spec.get("process"), dict, where, "process", "an object"), where)
    mounts = _expect(spec.get("mounts", []), list, where, "mounts", "a list")
    for index, mount in enumerate(mounts):
        key = f"mounts[{index}]"
        _expect(mount, dict, where, key, "an object")
        destination = _expect(mount.get("destination"), str, where, f"{key}.destination", "a path")
        if not destination.startswith("/"):
            raise _fail(where, f"{key}.destination", f"{destination!r} must be an absolute path")
        options = _expect(mount.get("options", []), list, where, f"{key}.options", "a list of strings")
        if not all(isinstance(option, str) for option in options):
            raise _fail(where, f"{key}.options", "must be a list of strings")
        if is_bind_mount(mount):
            source = _expect(mount.get("source"), str, where, f"{key}.source", "a bind mount's source path")
            if not source or "\0" in source:
                raise _fail(where, f"{key}.source", "a bind mount needs a source path")
    annotations = _expect(spec.get("annotations", {}), dict, where, "annotations", "an object")
    for name, value in annotations.items():
        _expect(value, str, where, f"annotations[{name!r}]", "a string")
    _check_linux(_expect(spec.get("linux", {}), dict, where, "linux", "an object"), where)


def _check_process(process: dict[str, Any], where: str) -> None:
    args = _expect(process.get("args"), list, where, "process.args", "a non-empty list of strings")
    if not args or not all(isinstance(a, str) for a in args):
        raise _fail(where, "process.args", "must be a non-empty list of strings")
    cwd = _expect(process.get("cwd", "/"), str, where, "process.cwd", "an absolute path")
    if not cwd.startswith("/"):
        raise _fail(where, "process.cwd", f"{cwd!r} is not an absolute path")
    env = _expect(process.get("env", []), list, where, "process.env", "a list of KEY=VALUE strings")
    for entry in env:
        if not isinstance(entry, str) or "=" not in entry:
            raise _fail(where, "process.env", f"{entry!r} is not KEY=VALUE")
    _expect(process.get("terminal", False), bool, where, "process.terminal", "true or false")
    user = _expect(process.get("user", {}), dict, where, "process.user", "an object")
    for key in ("uid", "gid", "umask"):
        if key in user:
            value = _expect(user[key], int, where, f"process.user.{key}", "a non-negative integer")
            if not 0 <= value < 2**32:
                raise _fail(where, f"process.user.{key}", f"{value} is out of range")
    groups = _expect(user.get("additionalGids", []), list, where, "process.user.additionalGids", "a list")
    for gid in groups:
        if not isinstance(gid, int) or isinstance(gid, bool) or not 0 <= gid < 2**32:
            raise _fail(where, "process.user.additionalGids", f"{gid!r} is not a group id")
    if user.get("username"):
        raise _fail(where, "process.user.username", "not supported on Linux (use uid and gid)")
    seen: set[str] = set()
    for key, limit, kind in _typed_entries(process.get("rlimits", []), where, "process.rlimits", RLIMITS,
                                           "rlimit", "an object with type, soft and hard"):
        if kind in seen:
            raise _fail(where, f"{key}.type", f"duplicate rlimit {kind}")
        seen.add(kind)
        for bound in ("soft", "hard"):
            value = _expect(limit.get(bound), int, where, f"{key}.{bound}", "a non-negative integer")
            if not 0 <= value < 2**64:
                raise _fail(where, f"{key}.{bound}", f"{value} is out of range")
        if limit["soft"] > limit["hard"]:
            raise _fail(where, key, f"soft limit {limit['soft']} exceeds hard limit {limit['hard']}")


def _typed_entries(items: Any, where: str, field: str, known: Collection[str], noun: str,
                   shape: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(key, entry, type) of each entry of the list ``field``: an object whose ``type`` is known."""
    for index, entry in enumerate(_expect(items, list, where, field, "a list")):
        key = f"{field}[{index}]"
        _expect(entry, dict, where, key, shape)
        kind = entry.get("type")
        if kind not in known:
            raise _fail(where, f"{key}.type", f"unknown {noun} type {kind!r}")
        yield key, entry, kind


def _check_linux(linux: dict[str, Any], where: str) -> None:
    for key in UNSUPPORTED_LINUX:
        if linux.get(key):
            raise _fail(where, f"linux.{key}", "not supported by Kabuto")
    _expect(linux.get("seccomp", {}), dict, where, "linux.seccomp", "an object")
    kinds = set()
    for key, namespace, kind in _typed_entries(linux.get("namespaces", []), where, "linux.namespaces",
                                               NAMESPACES, "namespace", "an object"):
        kinds.add(kind)
        path = namespace.get("path")
        if path:
            if kind not in JOINABLE_NAMESPACES:
                raise _fail(where, f"{key}.path", f"joining a host {kind} namespace is not possible from "
                                                  "inside a VM")
            if not isinstance(path, str) or not os.path.isabs(path):
                raise _fail(where, f"{key}.path", "must be an absolute path")
    _check_id_mappings(linux, "user" in kinds, where)
    sysctl = _expect(linux.get("sysctl", {}), dict, where, "linux.sysctl", "an object of strings")
    for name, value in sysctl.items():
        _expect(value, str, where, f"linux.sysctl[{name!r}]", "a string")


def _check_id_mappings(linux: dict[str, Any], user_namespace: bool, where: str) -> None:
    """As runc, before anything is made: mappings and a user namespace come together. Each
    mapping's ranges the guest checks, which applies them."""
    for field in ID_MAPPINGS:
        mappings = _expect(linux.get(field, []), list, where, f"linux.{field}", "a list")
        if user_namespace and not mappings:
            raise _fail(where, f"linux.{field}", "a user namespace (linux.namespaces: user) needs mappings")
        if mappings and not user_namespace:
            raise _fail(where, f"linux.{field}", "mappings need a user namespace (linux.namespaces: user)")
        for index, mapping in enumerate(mappings):
            _expect(mapping, dict, where, f"linux.{field}[{index}]", "an object of containerID, hostID, size")


def join_network_namespace(spec: dict[str, Any], path: str) -> None:
    """The spec's network namespace becomes ``path`` (a pod's netns, as CRI or CNI tooling made)."""
    namespaces = spec.setdefault("linux", {}).setdefault("namespaces", [])
    namespaces[:] = [ns for ns in namespaces if ns.get("type") != "network"]
    namespaces.append({"type": "network", "path": path})


def default_spec(args: list[str], rootfs: str = "rootfs", *, terminal: bool = False) -> dict[str, Any]:
    """What ``runc spec`` writes, with ``args`` as the process (``--rootless`` not modelled)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {kind: list(caps) for kind in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def load_process_file(path: str | Path) -> dict[str, Any]:
    """``exec --process FILE``: a whole OCI process object, checked as config.json's is."""
    try:
        raw = read_bounded(Path(path), MAX_CONFIG_BYTES)
    except OSError as exc:
        raise BundleError(f"open {path}: {exc.strerror or exc}") from None
    try:
        process = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    _check_process(_expect(process, dict, str(path), "(top level)", "a JSON object (an OCI process)"),
                   str(path))
    return process


def process_spec(args: list[str], base: dict[str, Any], *, env: list[str] | None = None,
                 cwd: str | None = None, terminal: bool = False, user: str | None = None,
                 caps: list[str] | None = None, additional_gids: list[int] | None = None,
                 no_new_privileges: bool = False) -> dict[str, Any]:
    """An OCI process for ``exec``: the container's own process settings with new args and
    runc exec's overrides (``--user uid[:gid]``, ``--cap`` added to each set, ``-g``...)."""
    if not args or not all(isinstance(a, str) for a in args):
        raise BundleError("exec: the command must be a non-empty list of strings")
    process = copy.deepcopy(base)
    process["args"] = list(args)
    process["terminal"] = terminal
    if user is not None:
        match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
        if match is None:
            raise BundleError(f"exec: --user {user!r} is not uid[:gid] (names mean nothing outside the "
                              "container's /etc/passwd)")
        process["user"] = {**process.get("user", {}), "uid": int(match[1])}
        if match[2] is not None:
            process["user"]["gid"] = int(match[2])
    if additional_gids:
        process.setdefault("user", {})["additionalGids"] = list(additional_gids)
    if caps:
        capabilities = process.setdefault("capabilities", {})
        for kind in {"bounding", "effective", "permitted", *capabilities}:
            have = capabilities.setdefault(kind, [])
            have.extend(c for c in caps if c not in have)
    if no_new_privileges:
        process["noNewPrivileges"] = True
    if env:
        merged = {e.split("=", 1)[0]: e for e in process.get("env", [])}
        for entry in env:
            if "=" not in entry:
                raise BundleError(f"exec: environment entry {entry!r} is not KEY=VALUE")
            merged[entry.split("=", 1)[0]] = entry
        process["env"] = list(merged.values())
    if cwd is not None:
        if not cwd.startswith("/"):
            raise BundleError(f"exec: cwd {cwd!r} is not an absolute path")
        process["cwd"] = cwd
    return process
