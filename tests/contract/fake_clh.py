#!/usr/bin/env python3
"""Test double of ``cloud-hypervisor --api-socket path=<sock>``: its REST API, not a VM.

Answers as Cloud Hypervisor's API documents: 204 for actions, 200 + JSON for ping/info and
for device adds on a running VM, errors as a JSON array of strings (root cause last) with
404 for a missing VM or device, 400 for a bad config, 409 for a duplicate id, 500 for an
invalid state transition. Binds the hybrid vsock socket at boot/restore.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path
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

PREFIX = "/api/v1/"
GET_ROUTES = {"vmm.ping", "vm.info", "vm.counters"}
PUT_ROUTES = {
    "vmm.shutdown",
    "vm.create",
    "vm.boot",
    "vm.shutdown",
    "vm.pause",
    "vm.resume",
    "vm.snapshot",
    "vm.restore",
    "vm.add-disk",
    "vm.add-net",
    "vm.add-fs",
    "vm.add-vsock",
    "vm.add-device",
    "vm.remove-device",
    "vm.delete",
    "vm.reboot",
    "vm.resize",
}
DEVICE_LISTS = {"vm.add-disk": "disks", "vm.add-net": "net", "vm.add-fs": "fs"}


def fail(status: int, *chain: str) -> Reply:
    return status, ["Error from API", *chain]


class FakeCloudHypervisor:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config: dict[str, Any] | None = None
        self.state = ""  # Created | Running | Paused | Shutdown
        self.bdfs: dict[str, str] = {}
        self.vcpus = VcpuThreads("vcpu%d")
        self.vsock: HybridVsock | None = None
        # device id -> our vhost-user connection to its virtiofsd
        self.fs_links: dict[str, socket.socket] = {}

    def handle(self, method: str, path: str, raw: bytes) -> Reply:
        action = path.removeprefix(PREFIX) if path.startswith(PREFIX) else ""
        if action not in GET_ROUTES | PUT_ROUTES:
            return fail(404, f"Unknown route {path}")
        if method != ("GET" if action in GET_ROUTES else "PUT"):
            return 400, None
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return fail(400, f"Error parsing JSON: {exc}")
        if injected_error(path):
            return fail(500, f"The {action} request failed", "injected fault")
        with self.lock:
            handler = getattr(self, "do_" + action.replace(".", "_").replace("-", "_"), None)
            if handler is None:
                return fail(500, f"{action} is not implemented by the fake")
            return handler(body)

    # -- VMM ------------------------------------------------------------------------------
    def do_vmm_ping(self, _: Any) -> Reply:
        return 200, {"version": "v41.0-fake", "build_version": "fake", "pid": os.getpid(), "features": []}

    def do_vmm_shutdown(self, _: Any) -> Reply:
        self._power_off()
        exit_soon()
        return 204, None

    # -- VM -------------------------------------------------------------------------------
    def do_vm_create(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return fail(400, "The VM could not be created", "Missing VmConfig body")
        if self.config is not None:
            return fail(500, "The VM could not be created", "VM is already created")
        payload = body.get("payload") or {}
        if not payload.get("kernel") and not payload.get("firmware"):
            return fail(
                400, "The VM could not be created", "Invalid VM config", "No kernel or firmware given"
            )
        if body.get("fs") and not (body.get("memory") or {}).get("shared"):
            return fail(
                400,
                "The VM could not be created",
                "Invalid VM config",
                "Using fs (vhost-user) requires shared memory",
            )
        ids = [d.get("id") for key in ("disks", "net", "fs") for d in body.get(key) or [] if d.get("id")]
        if len(ids) != len(set(ids)):
            return fail(409, "The VM could not be created", "Identifier is not unique")
        self.config = body
        self.state = "Created"
        return 204, None

    def do_vm_boot(self, _: Any) -> Reply:
        if self.config is None:
            return fail(404, "The VM could not boot", "VM is not created")
        if self.state != "Created":
            return fail(
                500, "The VM could not boot", f"Invalid state transition from {self.state} to Running"
            )
        kernel = self.config["payload"].get("kernel", "")
        if kernel and not os.path.isfile(kernel):
            return fail(500, "The VM could not boot", "Error loading kernel", f"Cannot open {kernel}")
        for disk in self.config.get("disks") or []:
            if not os.path.exists(disk.get("path", "")):
                return fail(500, "The VM could not boot", f"Failed to open disk image {disk.get('path')}")
        for fs in self.config.get("fs") or []:
            if not os.path.exists(fs["socket"]):
                return fail(
                    500, "The VM could not boot", f"Failed to connect to vhost-user socket {fs['socket']}"
                )
        self._power_on()
        return 204, None

    def do_vm_shutdown(self, _: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not shut down the VM", "VM is not created")
        if self.state not in ("Running", "Paused"):
            return fail(500, "Could not shut down the VM", f"Invalid state transition from {self.state}")
        self._power_off()
        self.state = "Shutdown"
        return 204, None

    def do_vm_pause(self, _: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not pause the VM", "VM is not created")
        if self.state != "Running":
            return fail(
                500, "Could not pause the VM", f"Invalid state transition from {self.state} to Paused"
            )
        self.state = "Paused"
        return 204, None

    def do_vm_resume(self, _: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not resume the VM", "VM is not created")
        if self.state != "Paused":
            return fail(
                500, "Could not resume the VM", f"Invalid state transition from {self.state} to Running"
            )
        self.state = "Running"
        return 204, None

    def do_vm_snapshot(self, body: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not snapshot the VM", "VM is not created")
        if self.state != "Paused":
            return fail(500, "Could not snapshot the VM", "VM is not paused")
        dest = _file_url(body, "destination_url")
        if dest is None or not dest.is_dir():
            return fail(500, "Could not snapshot the VM", f"Invalid destination {body!r}")
        (dest / "config.json").write_text(json.dumps(self.config))
        (dest / "state.json").write_text(json.dumps({"bdfs": self.bdfs}))
        (dest / "memory-ranges").write_bytes(b"\0" * 4096)
        return 204, None

    def do_vm_restore(self, body: Any) -> Reply:
        if self.config is not None:
            return fail(500, "Could not restore the VM", "VM is already created")
        source = _file_url(body, "source_url")
        if source is None or not (source / "config.json").is_file():
            return fail(500, "Could not restore the VM", f"Cannot open snapshot config in {body!r}")
        config = json.loads((source / "config.json").read_text())
        for fs in config.get("fs") or []:
            if not self._connect_fs(fs):
                return fail(
                    500, "Could not restore the VM", f"Failed to connect to vhost-user socket {fs['socket']}"
                )
        self.config = config
        self.bdfs = json.loads((source / "state.json").read_text())["bdfs"]
        self._power_on()
        self.state = "Running" if body.get("resume") else "Paused"
        return 204, None

    def do_vm_info(self, _: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not get VM info", "VM is not created")
        tree = {
            dev_id: {"id": dev_id, "resources": [], "children": [], "pci_bdf": bdf}
            for dev_id, bdf in self.bdfs.items()
        }
        memory = (self.config.get("memory") or {}).get("size", 0)
        return 200, {
            "config": self.config,
            "state": self.state,
            "memory_actual_size": memory,
            "device_tree": tree,
        }

    # -- devices --------------------------------------------------------------------------
    def _add(self, action: str, body: Any, key: str) -> Reply:
        if self.config is None:
            return fail(404, "Could not add the device", "VM is not created")
        if not isinstance(body, dict):
            return fail(400, "Could not add the device", "Missing body")
        dev_id = body.get("id") or f"_{key}{len(self.bdfs)}"
        if dev_id in self.bdfs:
            return fail(409, "Could not add the device", f"Identifier {dev_id} is not unique")
        if key == "disks" and not os.path.exists(body.get("path", "")):
            return fail(500, "Could not add the device", f"Failed to open disk image {body.get('path')}")
        if key == "fs":
            if not (self.config.get("memory") or {}).get("shared"):
                return fail(400, "Could not add the device", "Using fs (vhost-user) requires shared memory")
            if not self._connect_fs({**body, "id": dev_id}):
                return fail(500, "Could not add the device", f"Failed to connect to {body.get('socket')}")
        self.config.setdefault(key, []).append({**body, "id": dev_id})
        if self.state == "Created":
            return 204, None
        self.bdfs[dev_id] = f"0000:00:{len(self.bdfs) + 10:02x}.0"
        return 200, {"id": dev_id, "bdf": self.bdfs[dev_id]}

    def do_vm_add_disk(self, body: Any) -> Reply:
        return self._add("vm.add-disk", body, "disks")

    def do_vm_add_net(self, body: Any) -> Reply:
        return self._add("vm.add-net", body, "net")

    def do_vm_add_fs(self, body: Any) -> Reply:
        return self._add("vm.add-fs", body, "fs")

    def do_vm_add_vsock(self, body: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not add the device", "VM is not created")
        if self.config.get("vsock"):
            return fail(409, "Could not add the device", "Only one vsock device is allowed")
        self.config["vsock"] = body
        return 204, None

    def do_vm_remove_device(self, body: Any) -> Reply:
        if self.config is None:
            return fail(404, "Could not remove the device", "VM is not created")
        dev_id = (body or {}).get("id")
        if dev_id not in self.bdfs:
            return fail(404, "Could not remove the device", f"No device with id {dev_id!r}")
        del self.bdfs[dev_id]
        link = self.fs_links.pop(dev_id, None)
        if link is not None:
            link.close()
        for key in ("disks", "net", "fs"):
            self.config[key] = [d for d in self.config.get(key) or [] if d.get("id") != dev_id]
        return 204, None

    # -- guest ----------------------------------------------------------------------------
    def _power_on(self) -> None:
        assert self.config is not None
        cold = [d.get("id") for key in ("disks", "net", "fs") for d in self.config.get(key) or []]
        for dev_id in cold:
            if dev_id and dev_id not in self.bdfs:
                self.bdfs[dev_id] = f"0000:00:{len(self.bdfs) + 2:02x}.0"
        self.state = "Running"
        self.vcpus.start(self.config.get("cpus", {}).get("boot_vcpus", 1))
        vsock = self.config.get("vsock")
        if vsock:
            self.vsock = HybridVsock(vsock["socket"], lambda: self.state == "Running")

    def _connect_fs(self, fs: dict[str, Any]) -> bool:
        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            link.connect(fs.get("socket", ""))
        except OSError:
            link.close()
            return False
        self.fs_links[fs.get("id") or fs["tag"]] = link
        return True

    def _power_off(self) -> None:
        for link in self.fs_links.values():
            link.close()
        self.fs_links.clear()
        self.vcpus.stop()
        if self.vsock is not None:
            self.vsock.close()
            self.vsock = None


def _file_url(body: Any, key: str) -> Path | None:
    url = (body or {}).get(key, "") if isinstance(body, dict) else ""
    return Path(url.removeprefix("file://")) if url.startswith("file://") else None


def parse_args(argv: list[str]) -> str:
    """The --api-socket path; any flag the real binary would not take is an error."""
    socket_path = ""
    args = iter(argv)
    for arg in args:
        if arg == "--api-socket":
            value = next(args, "")
            socket_path = value.removeprefix("path=")
        elif arg == "--seccomp":
            next(args, "")
        elif arg == "-v":
            continue
        else:
            sys.exit(f"error: unexpected argument '{arg}' found")
    if not socket_path:
        sys.exit("error: --api-socket is required")
    return socket_path


def main() -> None:
    record({"argv": sys.argv, "pid": os.getpid()})
    socket_path = parse_args(sys.argv[1:])
    apply_startup_fault()
    vmm = FakeCloudHypervisor()
    serve(socket_path, vmm.handle).serve_forever()


if __name__ == "__main__":
    main()
