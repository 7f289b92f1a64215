"""`kabuto list`'s table: columns as wide as their longest cell, as runc's."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from kabuto.cli.main import cli
from kabuto.runtime import commands

ROWS = [
    {"id": "short", "pid": 7, "status": "running", "bundle": "/b",
     "created": "2026-11-25T18:45:11Z"},
    {"id": "a-much-longer-container-id", "pid": 12345, "status": "stopped",
     "bundle": "/run/containerd/io.containerd.runtime.v2.task/default/a-much-longer-container-id",
     "created": "2026-11-25T18:46:00Z"},
]


def test_columns_fit_their_longest_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    async def listed(options: Any) -> list[dict[str, Any]]:
        return ROWS

    monkeypatch.setattr(commands, "list_containers", listed)
    result = CliRunner().invoke(cli, ["list"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "PID", "STATUS", "BUNDLE", "CREATED"]
    for line, row in zip(lines[1:], ROWS, strict=True):
        assert line.split() == [row["id"], str(row["pid"]), row["status"], row["bundle"], row["created"]]
    # every column starts at the same offset on every line, the header's included
    starts = [lines[0].index(title) for title in ("PID", "STATUS", "BUNDLE", "CREATED")]
    for line, row in zip(lines[1:], ROWS, strict=True):
        assert [line.index(f" {row[key]}", start - 1) + 1 for key, start in
                zip(("pid", "status", "bundle", "created"), starts, strict=True)] == starts
