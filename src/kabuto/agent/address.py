"""Agent channel addresses, as ``Hypervisor.get_agent_socket()`` returns them.

- ``unix:///path``: a Unix socket; for a virtio-serial port, QEMU's chardev socket.
- ``vsock://CID:PORT``: AF_VSOCK (vhost-vsock).
- ``hvsock:///path/to/uds:PORT``: hybrid vsock (Firecracker, Cloud Hypervisor): connect to
  the Unix socket, send ``CONNECT PORT\\n``, read one line that must start with ``OK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kabuto.errors import AgentError

MAX_PORT = 0xFFFFFFFF


@dataclass(frozen=True)
class AgentAddress:
    scheme: Literal["unix", "vsock", "hvsock"]
    path: str = ""  # unix, hvsock
    cid: int = 0  # vsock
    port: int = 0  # vsock, hvsock

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        if self.scheme == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        return f"hvsock://{self.path}:{self.port}"


def _port(text: str, address: str) -> int:
    if not text.isdigit() or int(text) > MAX_PORT:
        raise AgentError(f"bad agent address {address!r}: port {text!r} is not a number up to {MAX_PORT}")
    return int(text)


def parse_agent_address(address: str) -> AgentAddress:
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise AgentError(f"bad agent address {address!r}: expected unix://, vsock:// or hvsock://")
    if scheme == "unix":
        if not rest.startswith("/"):
            raise AgentError(f"bad agent address {address!r}: unix:// needs an absolute path")
        return AgentAddress("unix", path=rest)
    if scheme == "vsock":
        cid, sep, port = rest.partition(":")
        if not sep or not cid.isdigit():
            raise AgentError(f"bad agent address {address!r}: expected vsock://CID:PORT")
        return AgentAddress("vsock", cid=int(cid), port=_port(port, address))
    if scheme == "hvsock":
        path, sep, port = rest.rpartition(":")
        if not sep or not path.startswith("/"):
            raise AgentError(f"bad agent address {address!r}: expected hvsock:///path/to/socket:PORT")
        return AgentAddress("hvsock", path=path, port=_port(port, address))
    raise AgentError(f"bad agent address {address!r}: unknown scheme {scheme!r} (unix, vsock or hvsock)")
