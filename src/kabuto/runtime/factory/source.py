"""Where a sandbox's VM comes from when not from a cold boot (Kata's VM factory), and the content
key that says whether a warm VM was made from the inputs this sandbox would boot with.

A source's ``take`` returns a running VM with no sandbox-specific device beyond the shares the
request names (and only where it can plug them), or None after logging why: the caller then
boots cold. The caller plugs NICs after, by hot-plug, and freshens the guest
(kabuto.runtime.freshen) before any container starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kabuto.config.model import HypervisorConfig
from kabuto.errors import KabutoError
from kabuto.hypervisor import Hypervisor, ResolvedConfig
from kabuto.hypervisor.base import HypervisorState
from kabuto.hypervisor.devices import SharedFsDevice
from kabuto.image.cache import guest_code_hash

log = logging.getLogger(__name__)

#: the table's files whose bytes decide what a VM is: the VMM, its kernel, initrd, image, firmware
KEY_FILES = ("path", "kernel", "initrd", "image", "firmware")
#: keys of the hypervisor table that say where warm VMs come from, not what they are
NOT_KEYED = frozenset({"factory"})
DIGEST_CHUNK = 1 << 20


class FactoryError(KabutoError):
    """A factory operation failed or was refused; the message names what and why."""


@dataclass
class WarmRequest:
    sandbox_id: str
    resolved: ResolvedConfig
    jailer_root: Path
    netns: str | None
    #: the sandbox's shares, for a source that can attach them once the VM runs
    shares: list[SharedFsDevice] = field(default_factory=list)
    timeout: float = 120.0
    #: records a VM another process hands over (its saved state, in the sandbox record) before
    #: that process lets it go: a creator killed from then on leaves it to the sandbox reaper
    claim: Callable[[HypervisorState], None] | None = None


class WarmSource(Protocol):
    #: what the logs and the sandbox record call it ("template", "cache")
    name: str

    async def take(self, request: WarmRequest) -> Hypervisor | None: ...


class DigestCache:
    """File digests keyed by path and stat identity (size, mtime, inode), kept in a JSON file
    beside the templates, so a start hashes only a file that changed (as git's index)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, file: str) -> str:
        try:
            st = os.stat(file)
        except OSError:
            return "missing"
        identity = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        known = self.entries.get(file)
        if isinstance(known, dict) and known.get("stat") == identity:
            return str(known.get("sha256"))
        sha = hashlib.sha256()
        with open(file, "rb") as handle:
            while chunk := handle.read(DIGEST_CHUNK):
                sha.update(chunk)
        self.entries[file] = {"stat": identity, "sha256": sha.hexdigest()}
        self.changed = True
        return sha.hexdigest()

    def save(self) -> None:
        if not self.changed or not self.path.parent.is_dir():
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            temporary.write_text(json.dumps(self.entries))
            os.replace(temporary, self.path)
        except OSError as exc:  # a cache: the next start hashes again
            log.debug("factory: cannot write %s: %s", self.path, exc)
            temporary.unlink(missing_ok=True)


def content_inputs(name: str, table: HypervisorConfig, digests: DigestCache) -> dict[str, Any]:
    """What a warm VM is made from: the backend, its effective table (VM size, kernel command
    line, devices...), the bytes of its files and Kabuto's guest code."""
    files = {key: digests.digest(value) for key in KEY_FILES if (value := getattr(table, key))}
    return {
        "hypervisor": name,
        "table": table.model_dump(mode="json", exclude=set(NOT_KEYED)),
        "files": files,
        "guest_code": guest_code_hash(),
    }


def content_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def differences(made: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Which inputs differ (table keys, files by name, guest code), for a message."""
    found: list[str] = []
    if made.get("hypervisor") != wanted.get("hypervisor"):
        found.append("hypervisor")
    for section in ("files", "table"):
        ours, theirs = made.get(section) or {}, wanted.get(section) or {}
        found += [key for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if made.get("guest_code") != wanted.get("guest_code"):
        found.append("Kabuto's guest code")
    return found
