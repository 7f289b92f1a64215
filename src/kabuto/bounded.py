"""Reading a file someone else wrote (a bundle's config.json, a sandbox record, a configuration
file), bounded: never more than a limit is read into memory."""

from __future__ import annotations

from pathlib import Path


class FileTooLarge(ValueError):
    """The file holds more than the limit; the message says the limit."""


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` (OSError as opening it raises); FileTooLarge above ``limit``."""
    with path.open("rb") as file:
        raw = file.read(limit + 1)
    if len(raw) > limit:
        raise FileTooLarge(f"larger than {limit} bytes")
    return raw
