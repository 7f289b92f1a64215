"""Growing a running QEMU VM, as Kata runtime-rs's resize_vcpu and resize_memory do: vCPUs by
device_add of the machine's CPU model into a free slot ``query-hotpluggable-cpus`` lists (the
guest sees them through ACPI CPU hot-plug), memory by a pc-dimm on a new memory backend within
``-m ...,slots=N,maxmem=M`` (ACPI memory hot-plug; the guest kernel onlines it by default). Neither
shrinks the VM."""

from __future__ import annotations

from typing import Any

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError
from kabuto.hypervisor.qemu.qmp import QmpSession

#: x86 Linux onlines memory in 128 MiB blocks: a DIMM is a multiple of that
DIMM_ALIGN_MIB = 128
DIMM_ID = "kabuto-dimm{}"
DIMM_BACKEND_ID = "kabuto-dimm-mem{}"
VCPU_ID = "kabuto-vcpu{}"


async def plugged_vcpus(qmp: QmpSession) -> tuple[int, list[dict[str, Any]]]:
    """(vCPUs present, the free hot-pluggable slots in QEMU's order)."""
    slots = await qmp.call("query-hotpluggable-cpus")
    free = [slot for slot in slots if "qom-path" not in slot]
    return len(slots) - len(free), free


async def grow_vcpus(qmp: QmpSession, table: HypervisorConfig, new: int) -> tuple[int, int]:
    before, free = await plugged_vcpus(qmp)
    if new <= before:
        return before, before
    if new - before > len(free):
        raise HypervisorError(f"qemu: cannot grow to {new} vCPUs: default_maxvcpus is "
                              f"{table.default_maxvcpus} ({before} present)")
    # QEMU lists the highest slots first; fill from the lowest, as the guest numbers them
    for slot in list(reversed(free))[:new - before]:
        props = slot["props"]
        # named by its topology (socket-core-thread ...), unique per slot
        name = "-".join(str(props[key]) for key in sorted(props))
        await qmp.call("device_add", {"driver": slot["type"], "id": VCPU_ID.format(name), **props})
    return before, new


async def grow_memory(qmp: QmpSession, table: HypervisorConfig, dimms: list[int], new_mib: int,
                      shared: bool) -> int:
    """Add one DIMM (a multiple of 128 MiB) so the VM has at least ``new_mib``; ``dimms`` (the
    MiB of each plugged so far) gains it. ``shared``: the boot RAM is a shared memfd (virtiofsd
    maps guest memory), so the DIMM must be one too."""
    current = table.default_memory + sum(dimms)
    if new_mib <= current:
        return current
    limit = table.default_maxmemory
    if new_mib > limit:
        raise HypervisorError(f"qemu: cannot grow memory to {new_mib} MiB: default_maxmemory is {limit} MiB")
    if len(dimms) >= table.memory_slots:
        raise HypervisorError(f"qemu: cannot grow memory: all {table.memory_slots} memory_slots are in use")
    size = -(-(new_mib - current) // DIMM_ALIGN_MIB) * DIMM_ALIGN_MIB
    size = min(size, (limit - current) // DIMM_ALIGN_MIB * DIMM_ALIGN_MIB)
    if size <= 0:
        raise HypervisorError(f"qemu: cannot grow memory to {new_mib} MiB: less than {DIMM_ALIGN_MIB} MiB "
                              f"left below default_maxmemory ({limit} MiB)")
    index = len(dimms)
    backend: dict[str, Any] = {"qom-type": "memory-backend-memfd" if shared else "memory-backend-ram",
                               "id": DIMM_BACKEND_ID.format(index), "size": size << 20}
    if shared:
        backend["share"] = True
    await qmp.call("object-add", backend)
    try:
        await qmp.call("device_add", {"driver": "pc-dimm", "id": DIMM_ID.format(index),
                                      "memdev": DIMM_BACKEND_ID.format(index)})
    except HypervisorError:
        await qmp.call("object-del", {"id": DIMM_BACKEND_ID.format(index)})
        raise
    dimms.append(size)
    return current + size
