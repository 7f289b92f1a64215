"""Fixtures for running the REST backends against the fake VMM API servers in this directory."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from vmm_fakes import Recorder


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    path = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VMM_RECORD", str(path))
    monkeypatch.delenv("FAKE_VMM_FAULT", raising=False)
    return Recorder(path)


@pytest.fixture
def jailer_root(vm_root: Path) -> Path:
    """The shared short jailer root; the test fails if a process or file is left in it."""
    return vm_root


@pytest.fixture
def boot_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        name: tmp_path / name for name in ("vmlinux", "initrd.img", "rootfs.img", "data.img", "data2.img")
    }
    for path in files.values():
        path.write_bytes(b"\0" * 4096)
    share = tmp_path / "share"
    share.mkdir()
    files["share"] = share
    return files


@pytest.fixture
async def fake_agent() -> AsyncIterator[Path]:
    """A Unix socket server standing in for the guest agent: answers ``pong:<line>``."""
    path = Path(tempfile.mkdtemp(prefix="kba-", dir="/tmp")) / "agent.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                writer.write(b"pong:" + line)
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    yield path
    server.close()
    await server.wait_closed()
    shutil.rmtree(path.parent, ignore_errors=True)
