"""The contract checker itself: it must catch what a backend could get wrong."""

from __future__ import annotations

from pathlib import Path

from api_contract import CLOUD_HYPERVISOR, FIRECRACKER, check_request

from kabuto.hypervisor.matrix import matrix_in, render_markdown

DOCS = Path(__file__).parents[2] / "docs" / "backends.md"


def test_conforming_requests_pass() -> None:
    body = {
        "payload": {"kernel": "/k"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "vsock": {"cid": 3, "socket": "/s"},
    }
    assert check_request(CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.create", body) == []
    drive = {"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": False, "is_read_only": True}
    assert check_request(FIRECRACKER, "PUT", "/drives/rootfs", drive) == []
    assert check_request(FIRECRACKER, "PATCH", "/vm", {"state": "Paused"}) == []


def test_schema_violations_are_caught() -> None:
    def errors(api, method, path, body):
        found = check_request(api, method, path, body)
        assert found, (method, path, body)
        return " ".join(found)

    assert "misses required field 'payload'" in errors(CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.create", {})
    assert "needs one of kernel, firmware" in errors(
        CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.create", {"payload": {}}
    )
    assert "has no field 'vcpus'" in errors(
        CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.create", {"payload": {"kernel": "/k"}, "vcpus": 1}
    )
    assert "below 3" in errors(
        CLOUD_HYPERVISOR,
        "PUT",
        "/api/v1/vm.create",
        {"payload": {"kernel": "/k"}, "vsock": {"cid": 2, "socket": "/s"}},
    )
    assert "expected an integer" in errors(
        FIRECRACKER, "PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 128}
    )
    assert "not one of" in errors(FIRECRACKER, "PATCH", "/vm", {"state": "paused"})
    assert "takes no body" in errors(CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.boot", {})
    assert "needs a VmSnapshotConfig body" in errors(CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.snapshot", None)
    assert "not an operation" in errors(CLOUD_HYPERVISOR, "POST", "/api/v1/vm.boot", None)
    assert "not an operation" in errors(FIRECRACKER, "PUT", "/vm", {"state": "Paused"})
    mismatch = {"drive_id": "b", "path_on_host": "/r", "is_root_device": False}
    assert "differs from the path's 'a'" in errors(FIRECRACKER, "PUT", "/drives/a", mismatch)
    bad_id = {"drive_id": "a-b", "path_on_host": "/r", "is_root_device": False}
    assert "breaks the id rule" in errors(FIRECRACKER, "PUT", "/drives/a-b", bad_id)
    assert "expected a list" in errors(
        CLOUD_HYPERVISOR, "PUT", "/api/v1/vm.create", {"payload": {"kernel": "/k"}, "disks": {"path": "/d"}}
    )


def test_docs_show_the_capabilities_the_code_declares() -> None:
    assert matrix_in(DOCS.read_text()) == render_markdown(), (
        "docs/backends.md is stale: run python -m kabuto.hypervisor.matrix --write docs/backends.md"
    )
