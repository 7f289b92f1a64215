"""The conformance fixtures: one VM per target (see conformance_targets.py), shared by the module.

TCG boots are slow, so each target boots once; the fixture stops and cleans it at the end
(unless the last scenario did) and fails if any process, socket or file is left in its root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from conformance_targets import (
    FAKE_VIRTIOFSD,
    TARGETS,
    Lifecycle,
    Target,
    find_leftovers,
    make_jailer_root,
)

from kabuto.config.model import HypervisorConfig
from kabuto.hypervisor import ResolvedConfig, new_hypervisor, resolve_config
from kabuto.hypervisor.base import Hypervisor, VmStatus

FAKE_ENV_CLEARED = ("FAKE_VMM_RECORD", "FAKE_VMM_FAULT")
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
AGENT_START_TIMEOUT = 30.0
# where the guest keeps what the scenarios copy in (a real guest's RAM-backed root)
GUEST_SCRATCH = "/tmp/kabuto-conformance"


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(t, id=t.id, marks=[] if t.fake_vmm else [pytest.mark.vm]) for t in TARGETS
    ],
)
def target(request: pytest.FixtureRequest) -> Target:
    selected: Target = request.param
    if selected.skip_reason:
        pytest.skip(selected.skip_reason)
    return selected


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set the environment the VMM process inherits; module-scoped, so no monkeypatch."""
    saved = {key: os.environ.get(key) for key in (*values, *FAKE_ENV_CLEARED)}
    for key in FAKE_ENV_CLEARED:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.asynccontextmanager
async def host_guest_agent(directory: Path) -> AsyncIterator[Path]:
    """The guest agent's code on this host, in its own mount and UTS namespaces, on a Unix socket.

    It stands in for the guest behind an API fake's hybrid vsock; the shipped image and the
    agent's vsock listener are not what runs here.
    """
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("the host-side guest agent needs root and util-linux unshare")
    socket_path = directory / "agent.sock"
    log_path = directory / "agent.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            unshare, "--mount", "--uts", "--propagation", "private", "--",
            sys.executable, "-m", "kabuto.guest", "--listen", f"unix://{socket_path}",
            stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(AGENT_START_TIMEOUT):
            while not socket_path.exists():
                if process.returncode is not None:
                    raise RuntimeError(f"the host guest agent exited: {log_path.read_text()[-2000:]}")
                await asyncio.sleep(0.05)
        yield socket_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _fake_table(target: Target, host_scratch: Path) -> ResolvedConfig:
    """The backend's built-in table, pointed at the API fake and placeholder boot files."""
    assert target.fake_vmm is not None
    resolved = resolve_config(None, hypervisor_name=target.name, validate=False)
    table: HypervisorConfig = resolved.table
    for name in ("vmlinux", "initrd.img"):
        (host_scratch / name).write_bytes(b"\0" * 4096)
    table.path = str(target.fake_vmm)
    table.kernel = str(host_scratch / "vmlinux")
    table.initrd = str(host_scratch / "initrd.img")
    table.image = ""
    if table.shared_fs.startswith("virtio-fs"):
        table.virtio_fs_daemon = str(FAKE_VIRTIOFSD)
    problems = resolved.plugin.validate(table)
    assert not problems, f"the fake's table does not validate: {problems}"
    return resolved


def make_scratch() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="kbc-scratch-", dir="/tmp"))
    scratch.chmod(0o755)  # the container's users must be able to enter its rootfs
    return scratch


async def _stop_and_clean(vm: Hypervisor) -> None:
    try:
        if vm.status not in (VmStatus.NEW, VmStatus.STOPPED):
            await asyncio.wait_for(vm.stop_vm(), STOP_TIMEOUT)
    finally:
        await asyncio.wait_for(vm.cleanup(), STOP_TIMEOUT)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lifecycle(target: Target) -> AsyncIterator[Lifecycle]:
    """Prepare and start the target's VM once; stop and clean it after the module's tests."""
    root = make_jailer_root("kbc-")
    host_scratch = make_scratch()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if target.fake_vmm is None:
                resolved = resolve_config(None, hypervisor_name=target.name)
                guest_scratch = GUEST_SCRATCH
            else:
                resolved = _fake_table(target, host_scratch)
                # the "guest" is this host: its scratch is ours, removed below
                guest_scratch = str(host_scratch / "guest")
                agent_socket = await stack.enter_async_context(host_guest_agent(host_scratch))
                stack.enter_context(_environment(FAKE_AGENT_SOCKET=str(agent_socket)))
            vm = new_hypervisor(resolved, jailer_root=root)
            state = Lifecycle(target, vm, root, host_scratch, guest_scratch)
            try:
                await vm.prepare_vm("conformance")
                state.observed["prepared"] = (vm.status, vm.vm_path.is_dir())
                await vm.start_vm(BOOT_TIMEOUT)
                state.observed["started"] = vm.status
                yield state
            finally:
                await _stop_and_clean(vm)
        leftovers = find_leftovers(root)
        assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(host_scratch, ignore_errors=True)
