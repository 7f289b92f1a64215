"""VM directory names: CRI's 64-character ids under a long state root still give socket paths
that fit sun_path (the shim's, QMP's, the agent ports' locks, virtiofsd's)."""

from __future__ import annotations

import os
from pathlib import Path

from kabuto.hypervisor.base import MAX_VM_DIR_NAME, vm_dir_name
from kabuto.hypervisor.qemu.backend import AGENT_PORT_COUNT, PORT_LOCK_SUFFIX
from kabuto.hypervisor.qemu.cmdline import VmPaths
from kabuto.hypervisor.vmm_process import MAX_UNIX_PATH
from kabuto.runtime.sandbox import SHARED_FS_DEVICE_ID
from kabuto.runtime.state import StateStore
from kabuto.shim.cli import socket_path

CRI_ID = "5ae6a624f4f810903560700d42fc465ad94e3e5e7aa407c153732aaa43eba1c9"
# the longest state root docs/kubernetes.md promises to handle
STATE_ROOT = Path("/var/lib/a-node-s-own-state-directory/for-kabuto-pods/states")


def test_short_ids_keep_their_name_and_long_ones_are_hashed() -> None:
    assert vm_dir_name("sb-1") == "sb-1"
    assert vm_dir_name("x" * MAX_VM_DIR_NAME) == "x" * MAX_VM_DIR_NAME
    name = vm_dir_name(CRI_ID)
    assert len(name) == MAX_VM_DIR_NAME and name.startswith(CRI_ID[:6])
    # ids sharing a long prefix stay apart
    assert vm_dir_name(CRI_ID[:-1] + "0") != name
    assert vm_dir_name(CRI_ID) == name


def test_every_socket_of_a_cri_pod_fits_under_a_60_byte_state_root() -> None:
    assert len(str(STATE_ROOT)) == 60
    store = StateStore(STATE_ROOT)
    vm = VmPaths(store.jailer_root / vm_dir_name(CRI_ID))
    sockets = [
        socket_path(store, "/run/containerd/containerd.sock", "k8s.io", CRI_ID),
        vm.qmp_socket, vm.console_socket,
        Path(f"{vm.agent_port_socket(AGENT_PORT_COUNT - 1)}{PORT_LOCK_SUFFIX}"),
        vm.vm_dir / f"fs-{SHARED_FS_DEVICE_ID}.sock",  # virtiofsd's, for the pod's shared directory
    ]
    too_long = [str(s) for s in sockets if len(os.fsencode(s)) > MAX_UNIX_PATH]
    assert not too_long
