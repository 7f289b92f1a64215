from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReseedRandomDevRequest(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ReseedRandomDevResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetGuestDateTimeRequest(_message.Message):
    __slots__ = ("sec", "usec")
    SEC_FIELD_NUMBER: _ClassVar[int]
    USEC_FIELD_NUMBER: _ClassVar[int]
    sec: int
    usec: int
    def __init__(self, sec: _Optional[int] = ..., usec: _Optional[int] = ...) -> None: ...

class SetGuestDateTimeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OnlineCpusRequest(_message.Message):
    __slots__ = ("cpus", "timeout_seconds")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cpus: int
    timeout_seconds: float
    def __init__(self, cpus: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class OnlineCpusResponse(_message.Message):
    __slots__ = ("online_cpus",)
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    online_cpus: int
    def __init__(self, online_cpus: _Optional[int] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class CheckResponse(_message.Message):
    __slots__ = ("status",)
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[CheckResponse.ServingStatus]
        SERVING: _ClassVar[CheckResponse.ServingStatus]
        NOT_SERVING: _ClassVar[CheckResponse.ServingStatus]
    UNKNOWN: CheckResponse.ServingStatus
    SERVING: CheckResponse.ServingStatus
    NOT_SERVING: CheckResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: CheckResponse.ServingStatus
    def __init__(self, status: _Optional[_Union[CheckResponse.ServingStatus, str]] = ...) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuestDetailsResponse(_message.Message):
    __slots__ = ("kernel_release", "mem_total_bytes", "online_cpus", "agent_version", "kernel_version", "machine", "agent_started_uptime_seconds", "uptime_seconds", "is_init", "init_started_uptime_seconds", "agent_serving_uptime_seconds")
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONLINE_CPUS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    AGENT_STARTED_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IS_INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_STARTED_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_SERVING_UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kernel_release: str
    mem_total_bytes: int
    online_cpus: int
    agent_version: str
    kernel_version: str
    machine: str
    agent_started_uptime_seconds: float
    uptime_seconds: float
    is_init: bool
    init_started_uptime_seconds: float
    agent_serving_uptime_seconds: float
    def __init__(self, kernel_release: _Optional[str] = ..., mem_total_bytes: _Optional[int] = ..., online_cpus: _Optional[int] = ..., agent_version: _Optional[str] = ..., kernel_version: _Optional[str] = ..., machine: _Optional[str] = ..., agent_started_uptime_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., is_init: _Optional[bool] = ..., init_started_uptime_seconds: _Optional[float] = ..., agent_serving_uptime_seconds: _Optional[float] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
