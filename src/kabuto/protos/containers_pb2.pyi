from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IPAddress(_message.Message):
    __slots__ = ("address", "prefix_length")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    address: str
    prefix_length: int
    def __init__(self, address: _Optional[str] = ..., prefix_length: _Optional[int] = ...) -> None: ...

class Interface(_message.Message):
    __slots__ = ("name", "mac", "addresses", "mtu")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    name: str
    mac: str
    addresses: _containers.RepeatedCompositeFieldContainer[IPAddress]
    mtu: int
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[IPAddress, _Mapping]]] = ..., mtu: _Optional[int] = ...) -> None: ...

class UpdateInterfaceRequest(_message.Message):
    __slots__ = ("interface",)
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    interface: Interface
    def __init__(self, interface: _Optional[_Union[Interface, _Mapping]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway", "device", "source", "scope")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    device: str
    source: str
    scope: int
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., scope: _Optional[int] = ...) -> None: ...

class UpdateRoutesRequest(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class UpdateRoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class ARPNeighbor(_message.Message):
    __slots__ = ("ip_address", "device", "mac")
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ip_address: str
    device: str
    mac: str
    def __init__(self, ip_address: _Optional[str] = ..., device: _Optional[str] = ..., mac: _Optional[str] = ...) -> None: ...

class AddARPNeighborsRequest(_message.Message):
    __slots__ = ("neighbors",)
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    neighbors: _containers.RepeatedCompositeFieldContainer[ARPNeighbor]
    def __init__(self, neighbors: _Optional[_Iterable[_Union[ARPNeighbor, _Mapping]]] = ...) -> None: ...

class AddARPNeighborsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Storage(_message.Message):
    __slots__ = ("source", "mount_point", "fstype", "options")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    FSTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    source: str
    mount_point: str
    fstype: str
    options: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., mount_point: _Optional[str] = ..., fstype: _Optional[str] = ..., options: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("hostname", "storages", "sandbox_id")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    storages: _containers.RepeatedCompositeFieldContainer[Storage]
    sandbox_id: str
    def __init__(self, hostname: _Optional[str] = ..., storages: _Optional[_Iterable[_Union[Storage, _Mapping]]] = ..., sandbox_id: _Optional[str] = ...) -> None: ...

class CreateSandboxResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DestroySandboxResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "oci_spec_json", "rootfs")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    oci_spec_json: bytes
    rootfs: Storage
    def __init__(self, container_id: _Optional[str] = ..., oci_spec_json: _Optional[bytes] = ..., rootfs: _Optional[_Union[Storage, _Mapping]] = ...) -> None: ...

class CreateContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StartContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class RemoveContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process_json")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process_json: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process_json: _Optional[bytes] = ...) -> None: ...

class ExecProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("exit_status",)
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    def __init__(self, exit_status: _Optional[int] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class SignalProcessResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WriteStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "data")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    data: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStdinResponse(_message.Message):
    __slots__ = ("written",)
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    written: int
    def __init__(self, written: _Optional[int] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class CloseStdinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadStreamRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "max_len")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    max_len: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., max_len: _Optional[int] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TtyWinResizeRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "rows", "cols")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    rows: int
    cols: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class TtyWinResizeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("pids",)
    PIDS_FIELD_NUMBER: _ClassVar[int]
    pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pids: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StatsContainerResponse(_message.Message):
    __slots__ = ("cpu_usage_usec", "cpu_user_usec", "cpu_system_usec", "memory_usage_bytes", "memory_limit_bytes", "pids_current", "pids_limit", "memory_oom_kills")
    CPU_USAGE_USEC_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_USEC_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_USEC_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    cpu_usage_usec: int
    cpu_user_usec: int
    cpu_system_usec: int
    memory_usage_bytes: int
    memory_limit_bytes: int
    pids_current: int
    pids_limit: int
    memory_oom_kills: int
    def __init__(self, cpu_usage_usec: _Optional[int] = ..., cpu_user_usec: _Optional[int] = ..., cpu_system_usec: _Optional[int] = ..., memory_usage_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., pids_current: _Optional[int] = ..., pids_limit: _Optional[int] = ..., memory_oom_kills: _Optional[int] = ...) -> None: ...

class CopyFileInRequest(_message.Message):
    __slots__ = ("path", "data", "mode", "offset", "container_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    mode: int
    offset: int
    container_id: str
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., mode: _Optional[int] = ..., offset: _Optional[int] = ..., container_id: _Optional[str] = ...) -> None: ...

class CopyFileInResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CopyFileOutRequest(_message.Message):
    __slots__ = ("path", "offset", "max_len", "container_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    max_len: int
    container_id: str
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., max_len: _Optional[int] = ..., container_id: _Optional[str] = ...) -> None: ...

class CopyFileOutResponse(_message.Message):
    __slots__ = ("data", "size", "mode")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    size: int
    mode: int
    def __init__(self, data: _Optional[bytes] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ...) -> None: ...

class PauseContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class PauseContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ResumeContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "resources")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    resources: bytes
    def __init__(self, container_id: _Optional[str] = ..., resources: _Optional[bytes] = ...) -> None: ...

class UpdateContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
