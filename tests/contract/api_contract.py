"""The parts of the Cloud Hypervisor and Firecracker APIs that Kabuto's backends use.

Written down from each project's published API description (cloud-hypervisor
vmm/src/api/openapi/cloud-hypervisor.yaml and vmm/src/api/http/mod.rs; firecracker
src/firecracker/swagger/firecracker.yaml and api_server/parsed_request.rs), in our own
compact form: per operation the method, path, body schema and success codes; per schema
the required and optional fields with their types. Only what the backends send is here.

Type notation: ``str``/``int``/``bool``; a schema name; ``[T]`` a list of T; a frozenset
an enum of strings; ``AtLeast(n)`` an int >= n.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AtLeast:
    minimum: int


@dataclass(frozen=True)
class Schema:
    required: dict[str, Any] = field(default_factory=dict)
    optional: dict[str, Any] = field(default_factory=dict)
    #: at least one of these must be present (e.g. a payload needs a kernel or firmware)
    one_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # may hold {param} placeholders
    body: str | None  # schema name, or None for no body
    success: tuple[int, ...]
    #: path parameter -> body field that must carry the same value
    path_matches_body: dict[str, str] = field(default_factory=dict)

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


@dataclass(frozen=True)
class Api:
    name: str
    operations: tuple[Operation, ...]
    schemas: dict[str, Schema]
    #: rule for ids that appear in paths (Firecracker: alphanumerics and '_')
    path_id: re.Pattern[str] | None = None
    #: body shape of an error answer
    error_shape: str = ""


# -- Cloud Hypervisor ---------------------------------------------------------------------
_CH = "/api/v1"
_RATE = {"bandwidth": "TokenBucket", "ops": "TokenBucket"}

CLOUD_HYPERVISOR = Api(
    name="cloud-hypervisor",
    error_shape="JSON array of strings, outermost error first, root cause last",
    operations=(
        Operation("GET", f"{_CH}/vmm.ping", None, (200,)),
        Operation("PUT", f"{_CH}/vmm.shutdown", None, (204,)),
        Operation("GET", f"{_CH}/vm.info", None, (200,)),
        Operation("PUT", f"{_CH}/vm.create", "VmConfig", (204,)),
        Operation("PUT", f"{_CH}/vm.boot", None, (204,)),
        Operation("PUT", f"{_CH}/vm.shutdown", None, (204,)),
        Operation("PUT", f"{_CH}/vm.pause", None, (204,)),
        Operation("PUT", f"{_CH}/vm.resume", None, (204,)),
        Operation("PUT", f"{_CH}/vm.snapshot", "VmSnapshotConfig", (204,)),
        Operation("PUT", f"{_CH}/vm.restore", "RestoreConfig", (204,)),
        # 204 before boot (cold add), 200 + PciDeviceInfo once the VM runs
        Operation("PUT", f"{_CH}/vm.add-disk", "DiskConfig", (200, 204)),
        Operation("PUT", f"{_CH}/vm.add-net", "NetConfig", (200, 204)),
        Operation("PUT", f"{_CH}/vm.add-fs", "FsConfig", (200, 204)),
        Operation("PUT", f"{_CH}/vm.remove-device", "VmRemoveDevice", (204,)),
    ),
    schemas={
        "VmConfig": Schema(
            required={"payload": "PayloadConfig"},
            optional={
                "cpus": "CpusConfig",
                "memory": "MemoryConfig",
                "disks": ["DiskConfig"],
                "net": ["NetConfig"],
                "rng": "RngConfig",
                "fs": ["FsConfig"],
                "serial": "SerialConfig",
                "console": "ConsoleConfig",
                "vsock": "VsockConfig",
                "iommu": bool,
                "watchdog": bool,
                "pvpanic": bool,
            },
        ),
        "PayloadConfig": Schema(
            optional={"firmware": str, "kernel": str, "cmdline": str, "initramfs": str},
            one_of=("kernel", "firmware"),
        ),
        "CpusConfig": Schema(
            required={"boot_vcpus": AtLeast(1), "max_vcpus": AtLeast(1)},
            optional={"kvm_hyperv": bool, "max_phys_bits": int, "nested": bool},
        ),
        "MemoryConfig": Schema(
            required={"size": AtLeast(1)},
            optional={
                "hotplug_size": int,
                "hotplugged_size": int,
                "mergeable": bool,
                "hotplug_method": frozenset({"Acpi", "VirtioMem"}),
                "shared": bool,
                "hugepages": bool,
                "hugepage_size": int,
                "prefault": bool,
                "thp": bool,
            },
        ),
        "DiskConfig": Schema(
            optional={
                "path": str,
                "readonly": bool,
                "direct": bool,
                "iommu": bool,
                "num_queues": AtLeast(1),
                "queue_size": AtLeast(1),
                "vhost_user": bool,
                "vhost_socket": str,
                "rate_limiter_config": "RateLimiterConfig",
                "id": str,
                "serial": str,
                "image_type": frozenset({"FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"}),
            },
            one_of=("path", "vhost_socket"),
        ),
        "NetConfig": Schema(
            optional={
                "tap": str,
                "ip": str,
                "mask": str,
                "mac": str,
                "host_mac": str,
                "mtu": int,
                "iommu": bool,
                "num_queues": AtLeast(1),
                "queue_size": AtLeast(1),
                "id": str,
                "rate_limiter_config": "RateLimiterConfig",
            }
        ),
        "RngConfig": Schema(required={"src": str}, optional={"iommu": bool}),
        "FsConfig": Schema(
            required={"tag": str, "socket": str, "num_queues": AtLeast(1), "queue_size": AtLeast(1)},
            optional={"id": str, "pci_segment": int},
        ),
        "ConsoleConfig": Schema(
            required={"mode": frozenset({"Off", "Pty", "Tty", "File", "Socket", "Null"})},
            optional={"file": str, "socket": str, "iommu": bool},
        ),
        "SerialConfig": Schema(
            required={"mode": frozenset({"Off", "Pty", "Tty", "File", "Socket", "Null"})},
            optional={"file": str, "socket": str},
        ),
        "VsockConfig": Schema(
            required={"cid": AtLeast(3), "socket": str},
            optional={"iommu": bool, "id": str, "pci_segment": int},
        ),
        "RateLimiterConfig": Schema(optional=_RATE),
        "TokenBucket": Schema(
            required={"size": AtLeast(0), "refill_time": AtLeast(0)}, optional={"one_time_burst": AtLeast(0)}
        ),
        "VmSnapshotConfig": Schema(required={"destination_url": str}),
        "RestoreConfig": Schema(
            required={"source_url": str},
            optional={
                "prefault": bool,
                "memory_restore_mode": frozenset({"Copy", "OnDemand"}),
                "resume": bool,
            },
        ),
        "VmRemoveDevice": Schema(required={"id": str}),
    },
)

# -- Firecracker --------------------------------------------------------------------------
FIRECRACKER = Api(
    name="firecracker",
    error_shape='JSON object {"fault_message": "<text>"}, status 400 for nearly every failure',
    path_id=re.compile(r"[A-Za-z0-9_]+"),
    operations=(
        Operation("GET", "/", None, (200,)),
        Operation("PUT", "/boot-source", "BootSource", (204,)),
        Operation("PUT", "/machine-config", "MachineConfiguration", (204,)),
        Operation("PUT", "/drives/{drive_id}", "Drive", (204,), {"drive_id": "drive_id"}),
        Operation(
            "PUT", "/network-interfaces/{iface_id}", "NetworkInterface", (204,), {"iface_id": "iface_id"}
        ),
        Operation("PUT", "/vsock", "Vsock", (204,)),
        Operation("PUT", "/actions", "InstanceActionInfo", (204,)),
        Operation("PATCH", "/vm", "Vm", (204,)),
        Operation("PUT", "/snapshot/create", "SnapshotCreateParams", (204,)),
        Operation("PUT", "/snapshot/load", "SnapshotLoadParams", (204,)),
    ),
    schemas={
        "BootSource": Schema(
            required={"kernel_image_path": str}, optional={"boot_args": str, "initrd_path": str}
        ),
        "MachineConfiguration": Schema(
            required={"vcpu_count": AtLeast(1), "mem_size_mib": AtLeast(1)},
            optional={
                "smt": bool,
                "track_dirty_pages": bool,
                "huge_pages": frozenset({"None", "Transparent", "2M"}),
            },
        ),
        "Drive": Schema(
            required={"drive_id": str, "is_root_device": bool},
            optional={
                "partuuid": str,
                "cache_type": frozenset({"Unsafe", "Writeback"}),
                "is_read_only": bool,
                "path_on_host": str,
                "rate_limiter": "RateLimiter",
                "io_engine": frozenset({"Sync", "Async"}),
                "socket": str,
            },
            one_of=("path_on_host", "socket"),
        ),
        "NetworkInterface": Schema(
            required={"iface_id": str, "host_dev_name": str},
            optional={"guest_mac": str, "rx_rate_limiter": "RateLimiter", "tx_rate_limiter": "RateLimiter"},
        ),
        "Vsock": Schema(required={"guest_cid": AtLeast(3), "uds_path": str}, optional={"vsock_id": str}),
        "InstanceActionInfo": Schema(
            required={"action_type": frozenset({"FlushMetrics", "InstanceStart", "SendCtrlAltDel"})}
        ),
        "Vm": Schema(required={"state": frozenset({"Paused", "Resumed"})}),
        "SnapshotCreateParams": Schema(
            required={"mem_file_path": str, "snapshot_path": str},
            optional={"snapshot_type": frozenset({"Full", "Diff"})},
        ),
        "SnapshotLoadParams": Schema(
            required={"snapshot_path": str},
            optional={
                "mem_backend": "MemoryBackend",
                "track_dirty_pages": bool,
                "resume_vm": bool,
                "network_overrides": ["NetworkOverride"],
                "vsock_override": "VsockOverride",
            },
            one_of=("mem_backend",),
        ),
        "MemoryBackend": Schema(
            required={"backend_type": frozenset({"File", "Uffd"}), "backend_path": str},
        ),
        "NetworkOverride": Schema(required={"iface_id": str, "host_dev_name": str}),
        "VsockOverride": Schema(required={"uds_path": str}),
        "RateLimiter": Schema(optional={"bandwidth": "TokenBucket", "ops": "TokenBucket"}),
        "TokenBucket": Schema(
            required={"size": AtLeast(0), "refill_time": AtLeast(0)}, optional={"one_time_burst": AtLeast(0)}
        ),
    },
)


# -- checking -----------------------------------------------------------------------------
def find_operation(api: Api, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
    for op in api.operations:
        if op.method != method:
            continue
        match = op.pattern().match(path)
        if match:
            return op, match.groupdict()
    return None


def check_request(api: Api, method: str, path: str, body: Any) -> list[str]:
    """Every way this request departs from the contract (empty when it conforms)."""
    found = find_operation(api, method, path)
    if found is None:
        return [f"{method} {path}: not an operation of the {api.name} contract"]
    op, params = found
    where = f"{method} {path}"
    if op.body is None:
        return [f"{where}: takes no body, got {body!r}"] if body is not None else []
    if body is None:
        return [f"{where}: needs a {op.body} body"]
    errors = check_value(api, op.body, body, where)
    for param, body_field in op.path_matches_body.items():
        value = params[param]
        if api.path_id is not None and not api.path_id.fullmatch(value):
            errors.append(f"{where}: path id {value!r} breaks the id rule {api.path_id.pattern}")
        if isinstance(body, dict) and body.get(body_field) != value:
            errors.append(
                f"{where}: body {body_field} {body.get(body_field)!r} differs from the path's {value!r}"
            )
    return errors


def check_value(api: Api, kind: Any, value: Any, where: str) -> list[str]:
    if isinstance(kind, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        errors: list[str] = []
        for index, item in enumerate(value):
            errors += check_value(api, kind[0], item, f"{where}[{index}]")
        return errors
    if isinstance(kind, frozenset):
        return [] if value in kind else [f"{where}: {value!r} is not one of {sorted(kind)}"]
    if isinstance(kind, AtLeast):
        if not _is_int(value):
            return [f"{where}: expected an integer, got {value!r}"]
        return [] if value >= kind.minimum else [f"{where}: {value} is below {kind.minimum}"]
    if kind is int:
        return [] if _is_int(value) else [f"{where}: expected an integer, got {value!r}"]
    if kind in (str, bool):
        ok = isinstance(value, kind)
        return [] if ok else [f"{where}: expected {kind.__name__}, got {value!r}"]
    return _check_object(api, api.schemas[kind], kind, value, where)


def _check_object(api: Api, schema: Schema, name: str, value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected a {name} object, got {type(value).__name__}"]
    errors: list[str] = []
    for key in schema.required:
        if key not in value:
            errors.append(f"{where}: {name} misses required field {key!r}")
    for key, item in value.items():
        kind = schema.required.get(key, schema.optional.get(key))
        if kind is None:
            errors.append(f"{where}: {name} has no field {key!r}")
            continue
        errors += check_value(api, kind, item, f"{where}.{key}")
    if schema.one_of and not any(key in value for key in schema.one_of):
        errors.append(f"{where}: {name} needs one of {', '.join(schema.one_of)}")
    return errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
