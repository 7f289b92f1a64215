"""The project's error types: every failure a user can cause is one of these."""

from __future__ import annotations

from dataclasses import dataclass


class KabutoError(Exception):
    """Base of every error Kabuto raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where, what value, why."""

    key: str
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key} = {self.value!r}: {self.reason}"


class ConfigError(KabutoError):
    """The configuration cannot be used; ``problems`` lists each reason."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems or [])
        detail = "".join(f"\n  {p}" for p in self.problems)
        super().__init__(message + detail)


class AnnotationError(ConfigError):
    """An OCI annotation tried to change something it may not."""


class HypervisorError(KabutoError):
    """A VMM operation failed; the message names the backend and the cause."""


class UnsupportedOperation(HypervisorError):
    """The backend does not support this operation (see its capabilities)."""


class HypervisorUnavailable(HypervisorError):
    """The backend cannot run on this host (missing binary, no binding...)."""


class VmTimeout(HypervisorError):
    """A bounded wait on the VM ran out."""


class ImageError(KabutoError):
    """The guest image cannot be built or found."""


class ProtocolError(KabutoError):
    """The peer broke the wire protocol (ttrpc framing, message decoding)."""


class AgentError(KabutoError):
    """The guest agent could not be reached or returned an error."""
