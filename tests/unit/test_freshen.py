"""Freshening a restored guest: the guest's checks on what the host sends, and the host's calls."""

from __future__ import annotations

import struct
import time
import uuid
from pathlib import Path

import pytest

from kabuto.guest import freshen
from kabuto.runtime.freshen import SEED_BYTES, freshen_guest


def test_reseed_refuses_nothing_and_too_much() -> None:
    with pytest.raises(freshen.FreshenError, match="no random bytes"):
        freshen.reseed(b"")
    with pytest.raises(freshen.FreshenError, match="more than 4096"):
        freshen.reseed(b"x" * (freshen.MAX_SEED_BYTES + 1))


def test_reseed_credits_the_bytes_and_reseeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[int, bytes | None]] = []
    monkeypatch.setattr(freshen.fcntl, "ioctl", lambda fd, op, arg=None: calls.append((op, arg)))
    device = tmp_path / "random"
    device.touch()
    freshen.reseed(b"abcde", device=str(device))
    (add, info), (reseed, _) = calls
    assert add == freshen.RNDADDENTROPY and reseed == freshen.RNDRESEEDCRNG
    assert struct.unpack("ii", info[:8]) == (40, 5) and info[8:] == b"abcde\0\0\0"


def test_the_clock_is_bounded() -> None:
    with pytest.raises(freshen.FreshenError):
        freshen.set_wall_clock(0, 0)
    with pytest.raises(freshen.FreshenError):
        freshen.set_wall_clock(int(time.time()), 1_000_000)


def test_each_sandbox_boot_id_is_new(tmp_path: Path) -> None:
    path = tmp_path / "run" / "boot_id"
    first = freshen.new_sandbox_boot_id(str(path))
    assert path.read_text() == first + "\n" and uuid.UUID(first).version == 4
    assert freshen.new_sandbox_boot_id(str(path)) != first
    assert path.stat().st_mode & 0o777 == 0o444


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def reseed_random_dev(self, data: bytes) -> None:
        self.calls.append(("reseed", data))

    async def set_guest_date_time(self, sec: int, usec: int) -> None:
        self.calls.append(("clock", sec + usec / 1e6))


async def test_freshen_guest_reseeds_then_sets_the_clock() -> None:
    agent = FakeAgent()
    await freshen_guest(agent)  # type: ignore[arg-type]
    (first, seed), (second, clock) = agent.calls
    assert first == "reseed" and isinstance(seed, bytes) and len(seed) == SEED_BYTES
    assert second == "clock" and abs(float(clock) - time.time()) < 1  # type: ignore[arg-type]
