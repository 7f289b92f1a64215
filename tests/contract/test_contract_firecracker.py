"""Firecracker backend (plain and under the jailer) against a fake of its REST API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from api_contract import FIRECRACKER, check_request, find_operation
from vmm_fakes import FAKE_FC, FAKE_JAILER, Recorder, alive, hvsock_roundtrip, leftovers

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable, UnsupportedOperation, VmTimeout
from kabuto.hypervisor.base import HypervisorState, VmStatus
from kabuto.hypervisor.devices import BlockDevice, NetworkDevice, SharedFsDevice, SharedFsKind
from kabuto.hypervisor.firecracker.backend import Firecracker

START_TIMEOUT = 30.0  # generous: a loaded machine starts Python slowly


def make_config(boot_files: dict[str, Path], jailed: bool = False, **overrides: object) -> HypervisorConfig:
    values: dict[str, object] = {
        "path": str(FAKE_FC),
        "jailer_path": str(FAKE_JAILER) if jailed else "",
        "kernel": str(boot_files["vmlinux"]),
        "image": str(boot_files["rootfs.img"]),
        "kernel_params": "quiet",
        "default_vcpus": 2,
        "default_maxvcpus": 2,
        "default_memory": 256,
        "shared_fs": "none",
    }
    values.update(overrides)
    return HypervisorConfig(**values)


def assert_conforms(recorder: Recorder, all_succeeded: bool = True) -> None:
    requests = recorder.requests()
    assert requests, "the backend sent no request"
    for request in requests:
        errors = check_request(FIRECRACKER, request["method"], request["path"], request["body"])
        assert not errors, errors
        if all_succeeded:
            op, _ = find_operation(FIRECRACKER, request["method"], request["path"])
            assert request["status"] in op.success, request


def calls(recorder: Recorder) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in recorder.requests()]


def body_of(recorder: Recorder, path: str) -> dict:
    return next(r["body"] for r in recorder.requests() if r["path"] == path)


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailed"])
async def test_full_lifecycle(
    recorder: Recorder, jailer_root: Path, boot_files, fake_agent, monkeypatch, jailed
) -> None:
    monkeypatch.setenv("FAKE_AGENT_SOCKET", str(fake_agent))
    vm = Firecracker(make_config(boot_files, jailed), jailer_root=jailer_root)
    await vm.prepare_vm("sandbox-1")
    container_rootfs = BlockDevice(id="ctr-rootfs", path=boot_files["data.img"])
    await vm.add_device(container_rootfs)
    await vm.add_device(NetworkDevice(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01"))
    await vm.start_vm(START_TIMEOUT)
    assert vm.status == VmStatus.RUNNING

    assert calls(recorder) == [
        "PUT /boot-source",
        "PUT /machine-config",
        "PUT /drives/rootfs",
        "PUT /vsock",
        "PUT /drives/ctr_rootfs",
        "PUT /network-interfaces/eth0",
        "PUT /actions",
    ]
    boot = body_of(recorder, "/boot-source")
    assert (
        "pci=off" in boot["boot_args"]
        and "root=/dev/vda ro" in boot["boot_args"]
        and "quiet" in boot["boot_args"]
    )
    assert body_of(recorder, "/machine-config") == {"vcpu_count": 2, "mem_size_mib": 256, "smt": False}
    assert body_of(recorder, "/actions") == {"action_type": "InstanceStart"}
    # the NIC as the runtime builds it from a pod endpoint: its tap and the interface's MAC
    assert body_of(recorder, "/network-interfaces/eth0") == {
        "iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"}
    assert container_rootfs.guest_address == "/dev/vdb"
    if jailed:
        root = vm.jail_root
        assert root == jailer_root / "sandbox-1" / "fake_firecracker.py" / "sandbox-1" / "root"
        assert boot["kernel_image_path"] == "/vmlinux"
        assert (root / "vmlinux").stat().st_ino == boot_files["vmlinux"].stat().st_ino  # hard-linked
        assert body_of(recorder, "/drives/ctr_rootfs")["path_on_host"] == "/drive-ctr_rootfs"
        assert body_of(recorder, "/vsock")["uds_path"] == "/fc-vm.sock"
        jailer_argv = recorder.argvs()[0]["argv"]
        assert jailer_argv[1:] == [
            "--id", "sandbox-1", "--exec-file", str(FAKE_FC), "--uid", "0", "--gid", "0",
            "--chroot-base-dir", str(jailer_root / "sandbox-1"), "--", "--api-sock", "/run/fc.sock",
        ]  # fmt: skip
        assert recorder.argvs()[1]["jail"] == str(root)
    else:
        assert boot["kernel_image_path"] == str(boot_files["vmlinux"])
        assert recorder.argvs()[0]["argv"][1:] == ["--api-sock", str(jailer_root / "sandbox-1" / "fc.sock")]

    (pid,) = await vm.get_pids()
    assert alive(pid)
    assert sorted((await vm.get_thread_ids()).vcpus) == [0, 1]
    assert (await vm.instance_info())["state"] == "Running"

    url = await vm.get_agent_socket()
    assert url == f"hvsock://{vm.vsock_socket}:1024"
    ok, reply = await hvsock_roundtrip(url, b"hello")
    assert ok.startswith("OK ") and reply == b"pong:hello\n"

    await vm.disconnect()  # drops the API client only: the next call reconnects
    await vm.pause_vm()
    assert (await vm.instance_info())["state"] == "Paused"
    ok, _ = await hvsock_roundtrip(url, b"hello")
    assert ok == ""  # a paused guest accepts no connection: the VMM closes it
    snapshot = await vm.save_vm()
    assert {p.name for p in snapshot.iterdir()} == {"vmstate", "memory"}
    await vm.resume_vm()

    before = len(recorder.requests())
    with pytest.raises(UnsupportedOperation, match="firecracker: hot-plugging a block device"):
        await vm.add_device(BlockDevice(id="late", path=boot_files["data2.img"]))
    with pytest.raises(UnsupportedOperation, match="firecracker: hot-plugging a block device"):
        await vm.remove_device(container_rootfs)
    assert len(recorder.requests()) == before  # refused without asking the VMM

    await vm.stop_vm()
    last = recorder.requests()[-1]
    assert last["path"] == "/actions" and last["body"] == {"action_type": "SendCtrlAltDel"}
    await vm.cleanup()
    await vm.cleanup()
    assert not any(alive(p) for p in recorder.pids())
    assert leftovers(jailer_root) == []
    assert_conforms(recorder)


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailed"])
async def test_snapshot_loads_into_a_fresh_vmm(
    recorder: Recorder, jailer_root: Path, boot_files, jailed
) -> None:
    config = make_config(boot_files, jailed)
    first = Firecracker(config, jailer_root=jailer_root)
    await first.prepare_vm("snap1")
    await first.start_vm(START_TIMEOUT)
    kept = jailer_root / "kept"
    (await first.save_vm()).rename(kept)
    await first.stop_vm()
    await first.cleanup()

    second = Firecracker(config, jailer_root=jailer_root)
    await second.prepare_vm("snap2")
    await second.start_vm(START_TIMEOUT, restore_from=kept)
    assert second.status == VmStatus.RUNNING
    assert (await second.instance_info())["state"] == "Running"
    load = body_of(recorder, "/snapshot/load")
    assert load["resume_vm"] is True and load["mem_backend"]["backend_type"] == "File"
    assert load["vsock_override"]["uds_path"] == ("/fc-vm.sock" if jailed else str(second.vsock_socket))
    ok, _ = await hvsock_roundtrip(await second.get_agent_socket(), b"x")
    assert ok.startswith("OK ")
    await second.stop_vm()
    await second.cleanup()
    assert leftovers(jailer_root) == [str(kept), str(kept / "memory"), str(kept / "vmstate")]
    shutil.rmtree(kept)  # the snapshot is the caller's to keep or remove
    assert_conforms(recorder)


async def test_another_process_takes_over_from_saved_state(
    recorder: Recorder, jailer_root: Path, boot_files
) -> None:
    config = make_config(boot_files, jailed=True)
    vm = Firecracker(config, jailer_root=jailer_root)
    await vm.prepare_vm("persist")
    await vm.add_device(BlockDevice(id="disk0", path=boot_files["data.img"]))
    await vm.start_vm(START_TIMEOUT)
    state = HypervisorState.from_dict(json.loads(json.dumps((await vm.save_state()).to_dict())))
    await vm.disconnect()

    again = await Firecracker.restore(state, jailer_root=jailer_root)
    # the table it booted with (jailed) comes from the saved state, not from anything read now
    assert again.jailed and again.config == config
    assert again.status == VmStatus.RUNNING and await again.get_pids() == state.pids
    assert [d.id for d in again.devices] == ["agent", "disk0"]
    await again.pause_vm()
    await again.resume_vm()
    await again.stop_vm()
    await again.cleanup()
    assert not any(alive(p) for p in state.pids)
    assert leftovers(jailer_root) == []


# -- bad input ------------------------------------------------------------------------------
async def start_failure(
    config: HypervisorConfig, jailer_root: Path, timeout: float = START_TIMEOUT
) -> Exception:
    vm = Firecracker(config, jailer_root=jailer_root)
    await vm.prepare_vm("bad")
    with pytest.raises(HypervisorError) as info:
        await vm.start_vm(timeout)
    assert vm.status == VmStatus.STOPPED and await vm.get_pids() == []
    assert leftovers(jailer_root) == []
    return info.value


async def test_missing_binary(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(make_config(boot_files, path="/nonexistent/firecracker"), jailer_root)
    assert isinstance(error, HypervisorUnavailable) and "firecracker" in str(error)
    assert "/nonexistent/firecracker" in str(error)


async def test_missing_jailer(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(make_config(boot_files, jailer_path="/nonexistent/jailer"), jailer_root)
    assert isinstance(error, HypervisorUnavailable) and "jailer binary /nonexistent/jailer not found" in str(
        error
    )


async def test_binary_that_exits_at_once(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(make_config(boot_files, path="/bin/false"), jailer_root)
    assert str(error).startswith("firecracker: ") and "exited with status 1" in str(error)


async def test_jailer_refusing_is_quoted(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(
        make_config(boot_files, jailed=True, path="/nonexistent/firecracker"), jailer_root
    )
    assert "jailer exited with status 1" in str(
        error
    ) and "Failed to canonicalize path /nonexistent/firecracker" in str(error)


async def test_socket_that_never_appears(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "hang")
    error = await start_failure(make_config(boot_files, jailed=True), jailer_root, timeout=1.0)
    assert isinstance(error, VmTimeout) and "fc.sock" in str(error)
    assert recorder.pids() and not any(alive(p) for p in recorder.pids())


async def test_api_error_body_is_reported(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "error:/actions")
    error = await start_failure(make_config(boot_files), jailer_root)
    assert "PUT /actions -> 400: injected fault" in str(error)
    assert not any(alive(p) for p in recorder.pids())


async def test_vmm_rejects_a_missing_kernel(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    boot_files["vmlinux"].unlink()
    error = await start_failure(make_config(boot_files, jailer_path=""), jailer_root)
    assert "PUT /boot-source -> 400: The kernel file cannot be opened" in str(error)


async def test_no_shared_fs_and_clashing_ids(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    vm = Firecracker(make_config(boot_files), jailer_root=jailer_root)
    await vm.prepare_vm("devs")
    with pytest.raises(UnsupportedOperation, match="firecracker: a shared-fs device is not supported"):
        await vm.add_device(
            SharedFsDevice(id="s", fs=SharedFsKind.VIRTIO_FS, host_path=Path("/"), mount_tag="s")
        )
    await vm.add_device(BlockDevice(id="a-b", path=boot_files["data.img"]))
    await vm.add_device(BlockDevice(id="a_b", path=boot_files["data2.img"]))
    with pytest.raises(HypervisorError, match="'a_b' clashes"):
        await vm.start_vm(START_TIMEOUT)
    assert leftovers(jailer_root) == []


async def test_invalid_ids_and_long_paths(jailer_root: Path, boot_files) -> None:
    vm = Firecracker(make_config(boot_files), jailer_root=jailer_root)
    with pytest.raises(HypervisorError, match="invalid VM id 'a/b'"):
        await vm.prepare_vm("a/b")
    deep = Firecracker(make_config(boot_files, jailed=True), jailer_root=jailer_root / ("d" * 40))
    with pytest.raises(HypervisorError, match="longer than 107 bytes"):
        await deep.prepare_vm("x" * 30)
    assert leftovers(jailer_root) == []


async def test_jailer_refuses_a_binary_not_named_firecracker(
    recorder: Recorder, jailer_root: Path, boot_files
) -> None:
    error = await start_failure(make_config(boot_files, jailed=True, path=str(FAKE_JAILER)), jailer_root)
    assert "jailer exited with status 1" in str(error) and "must contain 'firecracker'" in str(error)


async def test_a_stalled_api_call_is_bounded(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "stall:/machine-config")
    error = await start_failure(make_config(boot_files, jailed=True), jailer_root, timeout=5.0)
    assert isinstance(error, VmTimeout)
    assert "did not start within 5s (waiting for PUT /machine-config)" in str(error)
    assert not any(alive(p) for p in recorder.pids())


@pytest.fixture
def other_fs_disk(jailer_root: Path) -> Path:
    """A disk on another filesystem than the jailer root (tmpfs at /dev/shm), or skip."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == jailer_root.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) next to the jailer root")
    disk = shm / f"kbt-disk-{jailer_root.name}.img"
    disk.write_bytes(b"\0" * 4096)
    yield disk
    disk.unlink(missing_ok=True)


def is_copy(path: Path, of: Path) -> bool:
    """Same bytes, different file."""
    return path.read_bytes() == of.read_bytes() and not os.path.samefile(path, of)


async def test_jail_copies_read_only_files_across_filesystems(
    recorder: Recorder, jailer_root: Path, boot_files, other_fs_disk: Path
) -> None:
    vm = Firecracker(make_config(boot_files, jailed=True), jailer_root=jailer_root)
    await vm.prepare_vm("xfs-ro")
    await vm.add_device(BlockDevice(id="ro", path=other_fs_disk, read_only=True))
    await vm.start_vm(START_TIMEOUT)
    assert is_copy(vm.jail_root / "drive-ro", of=other_fs_disk)
    await vm.stop_vm()
    await vm.cleanup()


async def test_jail_refuses_to_copy_a_writable_disk(
    recorder: Recorder, jailer_root: Path, boot_files, other_fs_disk: Path
) -> None:
    vm = Firecracker(make_config(boot_files, jailed=True), jailer_root=jailer_root)
    await vm.prepare_vm("xfs-rw")
    await vm.add_device(BlockDevice(id="rw", path=other_fs_disk))
    with pytest.raises(HypervisorError, match=r"cannot hard-link the writable disk .* a copy would not"):
        await vm.start_vm(START_TIMEOUT)
    assert leftovers(jailer_root) == []
