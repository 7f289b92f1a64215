"""Helpers for the contract tests: the fakes' paths, their records, a hybrid vsock dialer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).parent
FAKE_CLH = HERE / "fake_clh.py"
FAKE_FC = HERE / "fake_firecracker.py"
FAKE_JAILER = HERE / "fake_jailer.py"
FAKE_VIRTIOFSD = HERE / "fake_virtiofsd.py"


class Recorder:
    """Reads what the fakes recorded: requests, argv lines, hybrid vsock commands."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def requests(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if "method" in e]

    def argvs(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if "argv" in e]

    def pids(self) -> list[int]:
        return [e["pid"] for e in self.argvs()]


async def hvsock_roundtrip(url: str, message: bytes) -> tuple[str, bytes]:
    """Dial ``hvsock://<uds>:<port>`` as the agent client would; return the OK line and the reply."""
    assert url.startswith("hvsock://"), url
    uds, _, port = url.removeprefix("hvsock://").rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(uds), 5)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        ok = (await asyncio.wait_for(reader.readline(), 5)).decode()
        reply = b""
        if ok.startswith("OK"):
            writer.write(message + b"\n")
            await writer.drain()
            reply = await asyncio.wait_for(reader.readline(), 5)
        return ok, reply
    finally:
        writer.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else []
