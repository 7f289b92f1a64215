"""Cloud Hypervisor backend against a fake of its REST API (the binary cannot be installed here)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from api_contract import CLOUD_HYPERVISOR, check_request, find_operation
from vmm_fakes import FAKE_CLH, FAKE_VIRTIOFSD, Recorder, alive, hvsock_roundtrip, leftovers

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError, HypervisorUnavailable, UnsupportedOperation, VmTimeout
from kabuto.hypervisor.base import HypervisorState, VmStatus
from kabuto.hypervisor.cloud_hypervisor.backend import CloudHypervisor
from kabuto.hypervisor.devices import (
    BlockDevice,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    VfioDevice,
)

START_TIMEOUT = 30.0  # generous: a loaded machine starts Python slowly


def make_config(boot_files: dict[str, Path], **overrides: object) -> HypervisorConfig:
    values: dict[str, object] = {
        "path": str(FAKE_CLH),
        "kernel": str(boot_files["vmlinux"]),
        "initrd": str(boot_files["initrd.img"]),
        "kernel_params": "quiet",
        "default_vcpus": 2,
        "default_maxvcpus": 2,
        "default_memory": 256,
        "shared_fs": "virtio-fs",
        "virtio_fs_daemon": str(FAKE_VIRTIOFSD),
    }
    values.update(overrides)
    return HypervisorConfig(**values)


def assert_conforms(recorder: Recorder) -> None:
    requests = recorder.requests()
    assert requests, "the backend sent no request"
    for request in requests:
        errors = check_request(CLOUD_HYPERVISOR, request["method"], request["path"], request["body"])
        assert not errors, errors


def assert_all_succeeded(recorder: Recorder) -> None:
    for request in recorder.requests():
        op, _ = find_operation(CLOUD_HYPERVISOR, request["method"], request["path"])
        assert request["status"] in op.success, request


def sent(recorder: Recorder) -> list[str]:
    return [r["path"].removeprefix("/api/v1/") for r in recorder.requests()]


async def test_full_lifecycle(
    recorder: Recorder, jailer_root: Path, boot_files, fake_agent, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_AGENT_SOCKET", str(fake_agent))
    vm = CloudHypervisor(make_config(boot_files), jailer_root=jailer_root)
    await vm.prepare_vm("sandbox1")
    await vm.add_device(BlockDevice(id="disk0", path=boot_files["data.img"], read_only=True))
    await vm.add_device(NetworkDevice(id="eth0", tap_name="tap0", mac="02:00:00:00:00:01", mtu=1400,
                                      queues=2))
    share = SharedFsDevice(
        id="share0", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="kataShared"
    )
    await vm.add_device(share)
    await vm.start_vm(START_TIMEOUT)
    assert vm.status == VmStatus.RUNNING

    create = next(r for r in recorder.requests() if r["path"].endswith("vm.create"))["body"]
    assert create["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert create["memory"]["size"] == 256 << 20 and create["memory"]["shared"] is True
    assert create["payload"]["initramfs"] == str(boot_files["initrd.img"])
    assert "quiet" in create["payload"]["cmdline"]
    assert [d["id"] for d in create["disks"]] == ["disk0"]
    # the NIC as the runtime builds it from a pod endpoint: MAC, MTU, two queue pairs (rx + tx each)
    assert {k: create["net"][0][k] for k in ("tap", "mac", "mtu", "num_queues")} == {
        "tap": "tap0", "mac": "02:00:00:00:00:01", "mtu": 1400, "num_queues": 4}
    assert create["fs"][0]["tag"] == "kataShared"
    assert create["vsock"]["cid"] == 3
    assert sent(recorder)[:3] == ["vmm.ping", "vm.create", "vm.boot"]
    disk0 = next(d for d in vm.devices if d.id == "disk0")
    assert disk0.guest_address == "serial:disk0" and create["disks"][0]["serial"] == "disk0"

    pids = await vm.get_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    threads = await vm.get_thread_ids()
    assert sorted(threads.vcpus) == [0, 1]

    url = await vm.get_agent_socket()
    assert url == f"hvsock://{vm.vm_path / 'ch-vm.sock'}:1024"
    ok, reply = await hvsock_roundtrip(url, b"ping")
    assert ok.startswith("OK ") and reply == b"pong:ping\n"

    await vm.disconnect()  # drops the API client only: the next call reconnects
    await vm.pause_vm()
    snapshot = await vm.save_vm()
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "state.json", "memory-ranges"}
    await vm.resume_vm()

    hot_disk = BlockDevice(id="disk1", path=boot_files["data2.img"])
    await vm.add_device(hot_disk)
    assert hot_disk.guest_address == "serial:disk1"
    hot_share = SharedFsDevice(
        id="share1", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="vol1"
    )
    await vm.add_device(hot_share)
    assert len(await vm.get_pids()) == 3
    await vm.remove_device(hot_disk)
    await vm.remove_device(hot_share)
    assert len(await vm.get_pids()) == 2
    info = await vm.info()
    assert info["state"] == "Running" and "disk1" not in info["device_tree"]

    await vm.stop_vm()
    assert vm.status == VmStatus.STOPPED
    await vm.cleanup()
    await vm.cleanup()  # twice is fine
    assert not any(alive(p) for p in pids + recorder.pids())
    assert leftovers(jailer_root) == []
    assert sent(recorder)[-2:] == ["vm.shutdown", "vmm.shutdown"]
    assert_conforms(recorder)
    assert_all_succeeded(recorder)
    argv = recorder.argvs()[0]["argv"]
    assert argv[1:] == ["--api-socket", f"path={jailer_root / 'sandbox1' / 'ch-api.sock'}"]


async def test_snapshot_restores_into_a_fresh_vmm(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    config = make_config(boot_files)

    def share() -> SharedFsDevice:
        return SharedFsDevice(
            id="share0", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="s"
        )

    first = CloudHypervisor(config, jailer_root=jailer_root)
    await first.prepare_vm("snap1")
    await first.add_device(share())
    await first.start_vm(START_TIMEOUT)
    snapshot = await first.save_vm()  # pauses a running VM first
    assert first.status == VmStatus.PAUSED
    kept = jailer_root / "kept-snapshot"
    snapshot.rename(kept)
    await first.stop_vm()
    await first.cleanup()

    second = CloudHypervisor(config, jailer_root=jailer_root)
    await second.prepare_vm("snap2")
    with pytest.raises(HypervisorError, match="add the same shared-fs device before restoring"):
        await second.start_vm(START_TIMEOUT, restore_from=kept)
    assert await second.get_pids() == []

    third = CloudHypervisor(config, jailer_root=jailer_root)
    await third.prepare_vm("snap3")
    await third.add_device(share())
    await third.start_vm(START_TIMEOUT, restore_from=kept)
    assert third.status == VmStatus.RUNNING
    assert (await third.info())["state"] == "Running"
    assert len(await third.get_pids()) == 2  # the VMM and the share's new virtiofsd
    ok, _ = await hvsock_roundtrip(await third.get_agent_socket(), b"x")
    assert ok.startswith("OK ")
    assert sent(recorder)[-4:] == ["vmm.ping", "vm.restore", "vm.resume", "vm.info"]
    restore = next(r for r in recorder.requests() if r["path"].endswith("vm.restore"))
    assert restore["body"]["source_url"] == f"file://{kept}"
    await third.stop_vm()
    await second.cleanup()
    await third.cleanup()
    assert leftovers(jailer_root) == [
        str(kept),
        *(str(kept / n) for n in ("config.json", "memory-ranges", "state.json")),
    ]
    shutil.rmtree(kept)  # the snapshot is the caller's to keep or remove
    assert_conforms(recorder)
    assert_all_succeeded(recorder)


async def test_another_process_takes_over_from_saved_state(
    recorder: Recorder, jailer_root: Path, boot_files
) -> None:
    config = make_config(boot_files)
    vm = CloudHypervisor(config, jailer_root=jailer_root)
    await vm.prepare_vm("persist")
    await vm.add_device(
        SharedFsDevice(id="share0", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="s")
    )
    await vm.start_vm(START_TIMEOUT)
    state = HypervisorState.from_dict(json.loads(json.dumps((await vm.save_state()).to_dict())))
    await vm.disconnect()

    again = await CloudHypervisor.restore(state, jailer_root=jailer_root)
    assert again.config == config
    assert again.status == VmStatus.RUNNING
    assert sorted(await again.get_pids()) == sorted(state.pids)
    assert sorted((await again.get_thread_ids()).vcpus) == [0, 1]
    await again.pause_vm()
    await again.resume_vm()
    await again.remove_device(again.devices[-1])  # the shared fs, known from the saved state
    await again.stop_vm()
    await again.cleanup()
    assert not any(alive(p) for p in state.pids)
    assert leftovers(jailer_root) == []
    assert_conforms(recorder)


async def test_kata_s_block_queues_shape_every_disk(
    recorder: Recorder, jailer_root: Path, boot_files
) -> None:
    # Kata's stock file: queue_size = 128, num_queues = 1; Kata's Cloud Hypervisor driver sends both
    vm = CloudHypervisor(make_config(boot_files, queue_size=128, num_queues=2), jailer_root=jailer_root)
    await vm.prepare_vm("queues")
    await vm.add_device(BlockDevice(id="disk0", path=boot_files["data.img"]))
    await vm.start_vm(START_TIMEOUT)
    await vm.add_device(BlockDevice(id="disk1", path=boot_files["data2.img"]))
    create = next(r for r in recorder.requests() if r["path"].endswith("vm.create"))["body"]
    hot = next(r for r in recorder.requests() if r["path"].endswith("vm.add-disk"))["body"]
    for disk in (create["disks"][0], hot):
        assert (disk["queue_size"], disk["num_queues"]) == (128, 2)
    await vm.stop_vm()
    await vm.cleanup()
    assert leftovers(jailer_root) == []
    assert_conforms(recorder)
    assert_all_succeeded(recorder)


async def test_a_virtiofsd_gone_before_another_process_takes_over_stops_the_vm(
    recorder: Recorder, jailer_root: Path, boot_files
) -> None:
    vm = CloudHypervisor(make_config(boot_files), jailer_root=jailer_root)
    await vm.prepare_vm("lost")
    await vm.add_device(
        SharedFsDevice(id="share0", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="s")
    )
    await vm.start_vm(START_TIMEOUT)
    state = await vm.save_state()
    await vm.disconnect()
    vmm_pid, daemon_pid = state.pids
    os.kill(daemon_pid, signal.SIGKILL)
    for _ in range(100):
        if not alive(daemon_pid):
            break
        await asyncio.sleep(0.05)

    again = await CloudHypervisor.restore(state, jailer_root=jailer_root)
    # the guest lost its share: the VM is stopped, not driven on (nor left unremovable)
    assert again.status == VmStatus.STOPPED
    assert not alive(vmm_pid)
    await again.cleanup()
    await vm.cleanup()
    assert leftovers(jailer_root) == []


# -- bad input ------------------------------------------------------------------------------
async def start_failure(
    config: HypervisorConfig, jailer_root: Path, timeout: float = START_TIMEOUT
) -> Exception:
    vm = CloudHypervisor(config, jailer_root=jailer_root)
    await vm.prepare_vm("bad")
    with pytest.raises(HypervisorError) as info:
        await vm.start_vm(timeout)
    assert vm.status == VmStatus.STOPPED
    assert await vm.get_pids() == []
    assert leftovers(jailer_root) == []
    return info.value


async def test_missing_binary(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(make_config(boot_files, path="/nonexistent/cloud-hypervisor"), jailer_root)
    assert isinstance(error, HypervisorUnavailable)
    assert "cloud-hypervisor" in str(error) and "/nonexistent/cloud-hypervisor" in str(error)


async def test_binary_that_exits_at_once(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    error = await start_failure(make_config(boot_files, path="/bin/false"), jailer_root)
    assert str(error).startswith("cloud-hypervisor: ") and "exited with status 1" in str(error)


async def test_exit_reason_is_quoted(recorder: Recorder, jailer_root: Path, boot_files, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "exit")
    error = await start_failure(make_config(boot_files), jailer_root)
    assert "exited with status 3" in str(error) and "cannot open /dev/kvm" in str(error)


async def test_socket_that_never_appears(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "hang")
    error = await start_failure(make_config(boot_files), jailer_root, timeout=1.0)
    assert isinstance(error, VmTimeout) and "ch-api.sock" in str(error)
    assert recorder.pids() and not any(alive(p) for p in recorder.pids())


async def test_api_error_body_is_reported(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "error:vm.boot")
    error = await start_failure(make_config(boot_files), jailer_root)
    assert "PUT /api/v1/vm.boot -> 500" in str(error) and "injected fault" in str(error)
    assert not any(alive(p) for p in recorder.pids())


async def test_vmm_rejects_a_missing_kernel(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    boot_files["vmlinux"].unlink()
    error = await start_failure(make_config(boot_files), jailer_root)
    assert "Cannot open" in str(error) and str(boot_files["vmlinux"]) in str(error)


async def test_missing_virtiofsd(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    vm = CloudHypervisor(make_config(boot_files, virtio_fs_daemon="/nonexistent/virtiofsd"), jailer_root)
    await vm.prepare_vm("nofsd")
    await vm.add_device(
        SharedFsDevice(id="s", fs=SharedFsKind.VIRTIO_FS, host_path=boot_files["share"], mount_tag="s")
    )
    with pytest.raises(HypervisorUnavailable, match="virtiofsd binary /nonexistent/virtiofsd not found"):
        await vm.start_vm(START_TIMEOUT)
    assert not any(alive(p) for p in recorder.pids())
    assert leftovers(jailer_root) == []


async def test_unsupported_and_conflicting_devices(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    vm = CloudHypervisor(make_config(boot_files, shared_fs="none"), jailer_root=jailer_root)
    await vm.prepare_vm("devs")
    with pytest.raises(UnsupportedOperation, match="cloud-hypervisor: VFIO"):
        await vm.add_device(VfioDevice(id="gpu", bdf="0000:01:00.0"))
    with pytest.raises(UnsupportedOperation, match="virtio-9p"):
        await vm.add_device(
            SharedFsDevice(id="p9", fs=SharedFsKind.VIRTIO_9P, host_path=Path("/"), mount_tag="t")
        )
    await vm.add_device(BlockDevice(id="disk0", path=boot_files["data.img"]))
    await vm.start_vm(START_TIMEOUT)
    # a duplicate id is the VMM's call (409 with its reason), not ours
    with pytest.raises(HypervisorError, match=r"409.*not unique"):
        await vm.add_device(BlockDevice(id="disk0", path=boot_files["data2.img"]))
    with pytest.raises(HypervisorError, match="no device with id 'ghost'"):
        await vm.remove_device(BlockDevice(id="ghost", path=boot_files["data.img"]))
    with pytest.raises(HypervisorError, match="cannot resume: VM is running"):
        await vm.resume_vm()
    await vm.stop_vm()
    await vm.cleanup()
    assert leftovers(jailer_root) == []


async def test_vmm_dying_under_us_is_named(recorder: Recorder, jailer_root: Path, boot_files) -> None:
    vm = CloudHypervisor(make_config(boot_files, shared_fs="none"), jailer_root=jailer_root)
    await vm.prepare_vm("dies")
    await vm.start_vm(START_TIMEOUT)
    (pid,) = await vm.get_pids()
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    with pytest.raises(HypervisorError, match="killed by signal 9"):
        await vm.pause_vm()
    await vm.cleanup()
    assert leftovers(jailer_root) == []


async def test_a_stalled_api_call_is_bounded(
    recorder: Recorder, jailer_root: Path, boot_files, monkeypatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_FAULT", "stall:vm.boot")
    error = await start_failure(make_config(boot_files, shared_fs="none"), jailer_root, timeout=5.0)
    assert isinstance(error, VmTimeout)
    assert "did not start within 5s (waiting for PUT vm.boot)" in str(error)
    assert not any(alive(p) for p in recorder.pids())
