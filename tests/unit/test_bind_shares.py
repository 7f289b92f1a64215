"""Host bind mounts of an OCI bundle, shared with the guest (the fake VMM and guest of
test_runtime_fake_vmm, real bind mounts on the host).

Each bind's source is bind-mounted under the sandbox share, read-only on the host side when the
OCI options say ro, and the guest spec's source points at the share's guest path. Without a
shared filesystem, or with a missing source, nothing is made at all.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import test_runtime_fake_vmm as fake_vmm
from test_runtime_fake_vmm import GUESTS, exists, mounts_below, options

from kabuto.runtime import bundle as bundle_module
from kabuto.runtime import commands
from kabuto.runtime.bundle import BundleError, default_spec, load_bundle
from kabuto.runtime.rootfs import GUEST_SHARE_DIR, binds_path
from kabuto.runtime.sandbox import SandboxError, VirtSandbox, remove_dead_sandbox
from kabuto.runtime.state import StateStore

# the fake VMM's fixtures: its registered fake backends (autouse) and a state root checked for leftovers
fakes = fake_vmm.fakes
store = fake_vmm.store


def bind(source: Path | str, destination: str, *options: str, kind: str = "bind") -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": str(source), "options": list(options)}


def bind_bundle(directory: Path, *mounts: dict[str, Any], **annotations: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rootfs").mkdir(exist_ok=True)
    spec = default_spec(["sleep"])
    spec["mounts"] += list(mounts)
    spec["annotations"] = dict(annotations)
    (directory / "config.json").write_text(json.dumps(spec))
    return directory


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a file in it, made a shared mount with another mount inside (at
    ``sub``), as kubelet's volume directories often are; and a file to mount alone."""
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "sub").mkdir()
    (tmp_path / "sub-source").mkdir()
    (tmp_path / "sub-source" / "inner").write_text("inner")
    (tmp_path / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    made: list[Path] = []
    try:
        for argv, target in ((["--bind", str(directory)], directory), (["--make-shared"], directory),
                             (["--bind", str(tmp_path / "sub-source")], directory / "sub")):
            subprocess.run(["mount", *argv, str(target)], check=True)
            if argv[0] == "--bind":
                made.append(target)
        yield directory
    finally:
        for target in reversed(made):
            subprocess.run(["umount", "--lazy", str(target)], check=False)


async def test_file_and_dir_sources_are_shared_ro_enforced_on_the_host(
        store: StateStore, tmp_path: Path, host: Path) -> None:
    bundle = bind_bundle(
        tmp_path / "b",
        bind(host, "/data", "rbind", "rw"),
        bind(tmp_path / "resolv.conf", "/etc/resolv.conf", "rbind", "ro"),
        bind(host, "/data-ro", "rbind", "ro", kind="none"),
        bind("/dev/null", "/dev/guest-null", "bind"),  # the guest's own device node
        bind(host / "sub" / "inner", "/inner", "rw", "bind", "ro", kind=""),  # the last of rw/ro wins
    )
    sandbox = await commands.create("c1", str(bundle), options(store))
    await sandbox.disconnect()
    shared = Path(sandbox.record.shared_dir) / "c1" / "mounts"
    first = len(default_spec(["true"])["mounts"])
    names = {0: host.name, 1: "resolv.conf", 2: host.name, 4: "inner"}
    data, resolv, data_ro, inner = (shared / str(first + i) / names[i] for i in (0, 1, 2, 4))
    assert sorted(p.name for p in shared.iterdir()) == sorted(str(first + i) for i in (0, 1, 2, 4))

    spec = GUESTS["c1"].containers["c1"]["spec"]
    guest_mounts = {m["destination"]: m for m in spec["mounts"]}
    for index, destination in ((0, "/data"), (1, "/etc/resolv.conf"), (2, "/data-ro"), (4, "/inner")):
        # the source's own name last, as the guest's mountinfo shows it (the suite's `mounts` check)
        source = f"{GUEST_SHARE_DIR}/c1/mounts/{first + index}/{names[index]}"
        assert guest_mounts[destination]["source"] == source
        assert guest_mounts[destination]["type"] == "bind"
    assert guest_mounts["/data-ro"]["options"] == ["rbind", "ro"]
    assert guest_mounts["/dev/guest-null"]["source"] == "/dev/null"

    # rw: what the guest writes reaches the host path, below the inner mount too
    (data / "written").write_text("from the guest")
    (data / "sub" / "written").write_text("below")
    assert (host / "written").read_text() == "from the guest"
    assert (tmp_path / "sub-source" / "written").read_text() == "below"
    # a file source is a file
    assert resolv.is_file() and resolv.read_text() == "nameserver 10.0.0.1\n"
    # ro: the host side refuses writes, on the top mount and on the mount inside it
    assert (data_ro / "sub" / "inner").read_text() == "inner"
    for path in (resolv, data_ro / "new", data_ro / "sub" / "new", data_ro / "written", inner):
        with pytest.raises(OSError) as refused:
            path.write_text("x")
        assert refused.value.errno == errno.EROFS, path
    assert (data_ro / "written").read_text() == "from the guest"

    await commands.kill("c1", "KILL", options(store))
    await commands.delete("c1", options(store))
    assert not exists(Path(sandbox.record.shared_dir))
    # unmounting the shares' trees did not propagate to the host's own mounts
    assert mounts_below(tmp_path) == [str(host), str(host / "sub")]
    assert (host / "sub" / "inner").read_text() == "inner"


async def test_pod_container_binds_and_sandbox_teardown(store: StateStore, tmp_path: Path,
                                                        host: Path) -> None:
    """A container joining a pod shares its binds too; deleting the sandbox with --force
    (teardown, not per-container removal) unmounts them all."""
    opts = options(store)
    sandbox = await commands.create("pod", str(bind_bundle(tmp_path / "p", bind(host, "/a"))), opts)
    await sandbox.disconnect()
    await commands.start("pod", opts)
    pod = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container", bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    joined = await commands.create(
        "app", str(bind_bundle(tmp_path / "app", bind(tmp_path / "resolv.conf", "/r", "ro"), **pod)), opts)
    await joined.disconnect()
    shared = Path(sandbox.record.shared_dir)
    assert len(mounts_below(shared)) == 4  # two rootfs, two binds
    spec = GUESTS["pod"].containers["app"]["spec"]
    assert spec["mounts"][-1]["source"].startswith(f"{GUEST_SHARE_DIR}/app/mounts/")
    await commands.delete("pod", opts, force=True)
    assert not mounts_below(store.root)


async def test_vmm_death_releases_bind_shares(store: StateStore, tmp_path: Path, host: Path) -> None:
    opts = options(store)
    sandbox = await commands.create("c1", str(bind_bundle(tmp_path / "b", bind(host, "/a", "ro"))), opts)
    await sandbox.disconnect()
    await commands.start("c1", opts)
    os.kill((await commands.state("c1", opts))["pid"], signal.SIGKILL)
    await until_stopped("c1", opts)
    assert not mounts_below(store.root)
    await commands.delete("c1", opts)


async def test_dead_vmm_cleanup_paths_release_bind_shares(store: StateStore, tmp_path: Path,
                                                          host: Path) -> None:
    """The shim's paths after a VMM death: release_container for one task, then
    remove_dead_sandbox for what the sandbox still holds."""
    opts = options(store)
    sandbox = await commands.create("pod", str(bind_bundle(tmp_path / "p", bind(host, "/a", "rbind"))), opts)
    await sandbox.disconnect()
    pod = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container", bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    joined = await commands.create(
        "app", str(bind_bundle(tmp_path / "app", bind(tmp_path / "resolv.conf", "/r", "ro"), **pod)), opts)
    await joined.disconnect()
    shared = Path(sandbox.record.shared_dir)
    vmm = psutil.Process(sandbox.hypervisor.pid)
    vmm.kill()
    await asyncio.to_thread(vmm.wait, 10)
    attached = await VirtSandbox.attach("pod", store)
    await attached.release_container("app")
    pod_bind = binds_path(shared, "pod") / str(len(default_spec(["true"])["mounts"])) / host.name
    assert mounts_below(shared) == [str(shared / "pod" / "rootfs"), str(pod_bind), str(pod_bind / "sub")]
    await remove_dead_sandbox(store, "pod")
    assert not mounts_below(store.root)


async def until_stopped(container_id: str, opts: commands.RuntimeOptions) -> None:
    for _ in range(500):
        if (await commands.state(container_id, opts))["status"] == "stopped":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{container_id} never stopped")


async def test_missing_source_is_refused_before_anything(store: StateStore, tmp_path: Path,
                                                         host: Path) -> None:
    missing = tmp_path / "absent"
    bundle = bind_bundle(tmp_path / "b", bind(host, "/ok"), bind(missing, "/host", "rbind", "ro"))
    with pytest.raises(BundleError, match=rf"mounts\[\d+\] \(/host\): bind source {missing} does not exist"):
        await commands.create("c1", str(bundle), options(store))
    assert not GUESTS  # no VM was started
    # a pod member too: the running sandbox keeps nothing of it
    sandbox = await commands.create("pod", str(bind_bundle(tmp_path / "p")), options(store))
    await sandbox.disconnect()
    pod = {bundle_module.CONTAINER_TYPE_ANNOTATION: "container", bundle_module.SANDBOX_ID_ANNOTATION: "pod"}
    (tmp_path / "later").mkdir()
    app = bind_bundle(tmp_path / "app", bind(tmp_path / "later", "/later"), **pod)
    (tmp_path / "later").rmdir()  # gone between loading the bundle and creating the container
    with pytest.raises(BundleError, match=r"bind source .*later does not exist"):
        await sandbox.create_container("app", load_bundle_unchecked(app))
    assert set(GUESTS["pod"].containers) == {"pod"}
    assert not exists(Path(sandbox.record.shared_dir) / "app")
    await commands.delete("pod", options(store), force=True)


def load_bundle_unchecked(directory: Path) -> Any:
    """The bundle as load_bundle read it while its sources still existed."""
    later = Path(json.loads((directory / "config.json").read_text())["mounts"][-1]["source"])
    later.mkdir()
    try:
        return load_bundle(directory)
    finally:
        later.rmdir()


async def test_no_shared_fs_is_refused_before_anything(store: StateStore, tmp_path: Path, host: Path) -> None:
    bundle = bind_bundle(tmp_path / "b", bind(host, "/data", "rbind", "ro"))
    with pytest.raises(SandboxError, match=r"mounts\[\d+\] \(/data, source .*\): bind mounts need a shared "
                                           r"filesystem; fakeblock has none"):
        await commands.create("c1", str(bundle), options(store, "fakeblock"))
    assert not GUESTS
    # guest-provided sources need no share: the block-device path still takes them
    assert not load_bundle(bind_bundle(tmp_path / "dev", bind("/dev/null", "/null"),
                                       bind("/proc", "/host-proc", "rbind"))).host_binds()


def test_host_binds_classification(tmp_path: Path, host: Path) -> None:
    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    (tmp_path / "b" / "relative").mkdir()
    spec = default_spec(["true"], str(tmp_path / "b" / "rootfs"))
    first = len(spec["mounts"])
    spec["mounts"] += [
        bind(host, "/d"),                                          # type bind
        bind(host, "/e", "rbind", "ro", kind="none"),              # options say bind
        {"destination": "/f", "source": "relative", "options": ["bind"]},  # relative to the bundle
        bind("/dev/null", "/g"),                                   # guest device node
        bind("/sys/fs/cgroup", "/h", "rbind"),                     # guest's own /sys
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
    ]
    (tmp_path / "b" / "config.json").write_text(json.dumps(spec))
    binds = load_bundle(tmp_path / "b").host_binds()
    assert [(b.index - first, b.destination, b.source, b.readonly, b.recursive) for b in binds] == [
        (0, "/d", host, False, False),
        (1, "/e", host, True, True),
        (2, "/f", tmp_path / "b" / "relative", False, False),
    ]


@pytest.mark.parametrize(("mount", "message"), [
    ({"destination": "/x", "type": "bind"}, r"mounts\[7\]\.source: must be a bind mount's source path"),
    ({"destination": "/x", "type": "bind", "source": ""}, "a bind mount needs a source path"),
    ({"destination": "/x", "source": "/tmp", "options": ["rbind", 1]}, r"options: must be a list of strings"),
])
def test_bad_bind_entries(tmp_path: Path, mount: dict[str, Any], message: str) -> None:
    (tmp_path / "rootfs").mkdir()
    spec = default_spec(["true"])
    spec["mounts"].append(mount)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)
