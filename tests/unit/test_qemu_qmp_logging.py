"""A failed QMP connect is reported once, by kabuto's error, not also by qemu.qmp's logger."""

from __future__ import annotations

import logging
import socket

import pytest

from kabuto.errors import HypervisorError
from kabuto.hypervisor.qemu.qmp import QmpSession


@pytest.fixture
def refusing_socket(tmp_path):
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the file stays, nobody listens: ECONNREFUSED, as after QEMU died
    return path


async def test_no_library_error_line_without_debug(refusing_socket, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(HypervisorError, match="cannot connect to QMP"):
        await QmpSession("vm", refusing_socket).connect(None, wait_for_socket=False)
    assert [r.getMessage() for r in caplog.records] == []


async def test_library_lines_kept_for_debug(refusing_socket, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HypervisorError):
        await QmpSession("vm", refusing_socket).connect(None, wait_for_socket=False)
    assert any("Failed to establish connection" in r.getMessage() for r in caplog.records)
