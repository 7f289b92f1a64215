"""How big a pod's VM must be, as Kata sizes it: the configured vCPUs and memory plus what the
containers' limits add (``default_vcpus`` + the sum of CPU quota/period, ``default_memory`` + the
sum of memory limits). The sandbox grows the VM to that when a container is created or updated,
where the backend can resize; it never shrinks it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MIB = 1024 * 1024


def memory_limit_mib(resources: dict[str, Any]) -> int:
    """An OCI linux.resources' memory limit in MiB, rounded up; 0 when there is none."""
    memory = resources.get("memory")
    limit = memory.get("limit") if isinstance(memory, dict) else None
    return -(-limit // MIB) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


def cpu_limit(resources: dict[str, Any]) -> float:
    """The CPUs an OCI linux.resources' CFS quota and period allow; 0 when unlimited."""
    cpu = resources.get("cpu")
    if not isinstance(cpu, dict):
        return 0.0
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        return quota / period
    return 0.0


def updated(resources: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``resources`` after a ``runc update``-style object: each section's keys replace the old ones."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in resources.items()}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def pod_size(default_vcpus: float, default_memory: int,
             containers: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """(vCPUs, memory in MiB) the pod's VM needs for these containers' resources."""
    resources = list(containers)
    vcpus = math.ceil(max(1.0, default_vcpus) + sum(cpu_limit(r) for r in resources))
    return vcpus, default_memory + sum(memory_limit_mib(r) for r in resources)
