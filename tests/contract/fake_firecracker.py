#!/usr/bin/env python3
"""Test double of ``firecracker --api-sock <sock>``: its REST API, not a VM.

Answers as Firecracker's API documents: 204 for PUT/PATCH, 200 + JSON for GET, errors as
``{"fault_message": ...}`` with 400; pre-boot resources refused after InstanceStart, PATCH
/vm refused before it, snapshot/create only when paused, snapshot/load only on a fresh
process. Opens files the way Firecracker does (kernel at PUT /boot-source, drive files at PUT
/drives, the vsock socket bound at PUT /vsock). Under the fake jailer (FAKE_JAIL_ROOT) every
path is resolved inside the jail, as a chrooted Firecracker would.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from typing import Any

from fake_common import (
    HybridVsock,
    Reply,
    VcpuThreads,
    apply_startup_fault,
    exit_soon,
    injected_error,
    record,
    serve,
)

JAIL_ROOT = os.environ.get("FAKE_JAIL_ROOT", "")
ID_RULE = re.compile(r"[A-Za-z0-9_]+")
AFTER_START = "The requested operation is not supported after starting the microVM."
BEFORE_START = "The requested operation is not supported before starting the microVM."


def fault(message: str) -> Reply:
    return 400, {"fault_message": message}


def host_path(path: str) -> str:
    """What a path sent over the API names on the host (inside the jail when jailed)."""
    if not JAIL_ROOT:
        return path
    return os.path.join(JAIL_ROOT, path.lstrip("/"))


class FakeFirecracker:
    def __init__(self, instance_id: str) -> None:
        self.lock = threading.Lock()
        self.instance_id = instance_id
        self.state = "Not started"  # | Running | Paused
        self.boot_source: dict[str, Any] | None = None
        self.machine = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False}
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.vsock_config: dict[str, Any] | None = None
        self.vsock: HybridVsock | None = None
        self.configured = False
        self.vcpus = VcpuThreads("fc_vcpu %d")

    def handle(self, method: str, path: str, raw: bytes) -> Reply:
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return fault(f"An error occurred when deserializing the json body of a request: {exc}")
        if method in ("PUT", "PATCH") and body is None:
            return fault("Empty PATCH/PUT request.")
        if injected_error(path):
            return fault("injected fault")
        parts = path.strip("/").split("/")
        with self.lock:
            match method, parts:
                case "GET", [""]:
                    return 200, self.info()
                case "GET", ["version"]:
                    return 200, {"firecracker_version": "1.17.0-fake"}
                case "PUT", ["boot-source"]:
                    return self.put_boot_source(body)
                case "PUT", ["machine-config"]:
                    return self.put_machine_config(body)
                case "PUT", ["drives", drive_id]:
                    return self.put_drive(drive_id, body)
                case "PUT", ["network-interfaces", iface_id]:
                    return self.put_iface(iface_id, body)
                case "PUT", ["vsock"]:
                    return self.put_vsock(body)
                case "PUT", ["actions"]:
                    return self.put_action(body)
                case "PATCH", ["vm"]:
                    return self.patch_vm(body)
                case "PUT", ["snapshot", "create"]:
                    return self.snapshot_create(body)
                case "PUT", ["snapshot", "load"]:
                    return self.snapshot_load(body)
        return fault(f"Invalid request method and/or path: {method} {path}.")

    def info(self) -> dict[str, Any]:
        return {
            "app_name": "Firecracker",
            "id": self.instance_id,
            "state": self.state,
            "vmm_version": "1.17.0",
        }

    # -- pre-boot configuration -------------------------------------------------------------
    def _pre_boot(self) -> Reply | None:
        return fault(AFTER_START) if self.state != "Not started" else None

    def put_boot_source(self, body: dict[str, Any]) -> Reply:
        if refused := self._pre_boot():
            return refused
        if "kernel_image_path" not in body:
            return fault("missing field `kernel_image_path`")
        for key in ("kernel_image_path", "initrd_path"):
            if key in body and not os.path.isfile(host_path(body[key])):
                return fault(
                    f"The {key.split('_')[0]} file cannot be opened: No such file or directory (os error 2)"
                )
        self.boot_source = body
        self.configured = True
        return 204, None

    def put_machine_config(self, body: dict[str, Any]) -> Reply:
        if refused := self._pre_boot():
            return refused
        vcpus, mem = body.get("vcpu_count"), body.get("mem_size_mib")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 32:
            return fault(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT."
            )
        if not isinstance(mem, int) or mem < 1:
            return fault("The memory size (MiB) is invalid.")
        self.machine = {"smt": False, **body}
        self.configured = True
        return 204, None

    def put_drive(self, drive_id: str, body: dict[str, Any]) -> Reply:
        if refused := self._pre_boot():
            return refused
        if not ID_RULE.fullmatch(drive_id):
            return fault(f"Invalid ID: {drive_id}")
        if body.get("drive_id") != drive_id:
            return fault("The id from the path does not match the id from the body!")
        if not isinstance(body.get("is_root_device"), bool):
            return fault("missing field `is_root_device`")
        if not os.path.exists(host_path(body.get("path_on_host", ""))):
            return fault(
                "Unable to create the block device: BackingFile(Os { code: 2, message: No such file })"
            )
        self.drives[drive_id] = body
        self.configured = True
        return 204, None

    def put_iface(self, iface_id: str, body: dict[str, Any]) -> Reply:
        if refused := self._pre_boot():
            return refused
        if not ID_RULE.fullmatch(iface_id):
            return fault(f"Invalid ID: {iface_id}")
        if body.get("iface_id") != iface_id:
            return fault("The id from the path does not match the id from the body!")
        if not body.get("host_dev_name"):
            return fault("missing field `host_dev_name`")
        self.ifaces[iface_id] = body
        self.configured = True
        return 204, None

    def put_vsock(self, body: dict[str, Any]) -> Reply:
        if refused := self._pre_boot():
            return refused
        if not isinstance(body.get("guest_cid"), int) or body["guest_cid"] < 3 or not body.get("uds_path"):
            return fault("Invalid vsock config")
        try:
            self._bind_vsock(body["uds_path"])
        except OSError as exc:
            return fault(f"Cannot create backend for vsock device: UnixBind({exc})")
        self.vsock_config = body
        self.configured = True
        return 204, None

    def _bind_vsock(self, uds_path: str) -> None:
        if self.vsock is not None:
            self.vsock.close()
        self.vsock = HybridVsock(host_path(uds_path), lambda: self.state == "Running")

    # -- runtime ----------------------------------------------------------------------------
    def put_action(self, body: dict[str, Any]) -> Reply:
        action = body.get("action_type")
        if action == "InstanceStart":
            if self.state != "Not started":
                return fault(AFTER_START)
            if self.boot_source is None:
                return fault("Cannot start microvm without kernel configuration.")
            self.state = "Running"
            self.vcpus.start(self.machine["vcpu_count"])
            return 204, None
        if action == "SendCtrlAltDel":
            if self.state == "Not started":
                return fault(BEFORE_START)
            exit_soon()  # the guest reboots and Firecracker exits
            return 204, None
        if action == "FlushMetrics":
            return fault("The metrics system is not initialized.")
        return fault(f"unknown variant `{action}`")

    def patch_vm(self, body: dict[str, Any]) -> Reply:
        if self.state == "Not started":
            return fault(BEFORE_START)
        wanted = body.get("state")
        if wanted not in ("Paused", "Resumed"):
            return fault(f"unknown variant `{wanted}`, expected `Paused` or `Resumed`")
        self.state = "Paused" if wanted == "Paused" else "Running"
        return 204, None

    def snapshot_create(self, body: dict[str, Any]) -> Reply:
        if self.state == "Not started":
            return fault(BEFORE_START)
        if self.state != "Paused":
            return fault("Cannot create snapshot: the microVM is not paused.")
        state = {
            "boot_source": self.boot_source,
            "machine": self.machine,
            "drives": self.drives,
            "ifaces": self.ifaces,
            "vsock": self.vsock_config,
        }
        try:
            with open(host_path(body["snapshot_path"]), "w") as f:
                json.dump(state, f)
            with open(host_path(body["mem_file_path"]), "wb") as f:
                f.write(b"\0" * 4096)
        except (OSError, KeyError) as exc:
            return fault(f"Cannot save the microVM state: {exc}")
        return 204, None

    def snapshot_load(self, body: dict[str, Any]) -> Reply:
        if self.configured or self.state != "Not started":
            return fault("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        backend = body.get("mem_backend") or {}
        mem = backend.get("backend_path", "")
        try:
            with open(host_path(body["snapshot_path"])) as f:
                state = json.load(f)
        except (OSError, KeyError, ValueError) as exc:
            return fault(f"Load snapshot error: cannot open the snapshot file: {exc}")
        if not os.path.isfile(host_path(mem)):
            return fault(f"Load snapshot error: cannot open the memory file {mem}")
        self.boot_source, self.machine = state["boot_source"], state["machine"]
        self.drives, self.ifaces, self.vsock_config = state["drives"], state["ifaces"], state["vsock"]
        uds = (body.get("vsock_override") or {}).get("uds_path") or (self.vsock_config or {}).get("uds_path")
        if uds:
            try:
                self._bind_vsock(uds)
            except OSError as exc:
                return fault(f"Load snapshot error: vsock: {exc}")
        self.state = "Running" if body.get("resume_vm") else "Paused"
        self.vcpus.start(self.machine["vcpu_count"])
        return 204, None


def parse_args(argv: list[str]) -> tuple[str, str]:
    socket_path, instance_id = "/run/firecracker.socket", "anonymous-instance"
    args = iter(argv)
    for arg in args:
        if arg == "--api-sock":
            socket_path = next(args, "")
        elif arg.startswith("--id="):
            instance_id = arg.removeprefix("--id=")
        elif arg == "--id":
            instance_id = next(args, "")
        elif arg == "--no-seccomp" or arg.startswith(("--start-time-us=", "--start-time-cpu-us=")):
            continue
        else:
            sys.exit(f"Arguments parsing error: Found argument '{arg}' which wasn't expected.")
    return host_path(socket_path), instance_id


def main() -> None:
    record({"argv": sys.argv, "pid": os.getpid(), "jail": JAIL_ROOT})
    socket_path, instance_id = parse_args(sys.argv[1:])
    apply_startup_fault()
    vmm = FakeFirecracker(instance_id)
    serve(socket_path, vmm.handle).serve_forever()


if __name__ == "__main__":
    main()
