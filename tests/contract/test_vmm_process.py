"""The process plumbing both REST backends share: capped logs, netns entry, SIGTERM -> SIGKILL, adoption."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from vmm_fakes import FAKE_CLH, Recorder, alive

from kabuto.config.model import HypervisorConfig
from kabuto.errors import HypervisorError
from kabuto.hypervisor import vmm_process
from kabuto.hypervisor.cloud_hypervisor.backend import CloudHypervisor
from kabuto.hypervisor.rest_api import ApiClient
from kabuto.hypervisor.vmm_process import VmmProcess


async def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    stubborn = VmmProcess("test", "stubborn", tmp_path / "log")
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    await stubborn.spawn([sys.executable, "-c", script])
    for _ in range(600):  # a loaded machine can take seconds to start Python
        if "up" in stubborn.log_tail():
            break
        await stubborn.wait_exit(0.05)
    assert "up" in stubborn.log_tail(), "the child never got to ignore SIGTERM"
    pid = stubborn.pid
    await stubborn.stop(grace=0.5)
    assert pid is not None and not alive(pid)
    assert "killed by signal 9" in stubborn.exit_description()


async def test_log_is_capped_and_the_pipe_kept_drained(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(vmm_process, "LOG_CAP_BYTES", 64 << 10)
    chatty = VmmProcess("test", "chatty", tmp_path / "chatty.log")
    # 4 MiB is far more than a pipe buffers: a writer that nobody drains would block
    script = "import sys; sys.stdout.write('x' * (4 << 20)); print('done', flush=True)"
    await chatty.spawn([sys.executable, "-c", script])
    assert await chatty.wait_exit(30)
    await chatty.stop()
    log = (tmp_path / "chatty.log").read_bytes()
    assert log.startswith(b"x" * (64 << 10)) and log.endswith(b"[kabuto: log capped at 65536 bytes]\n")
    assert chatty.log_tail().endswith("done")


async def test_adopt_refuses_a_recycled_pid(tmp_path: Path) -> None:
    proc = VmmProcess("test", "vmm")
    with pytest.raises(HypervisorError, match="belongs to another process"):
        proc.adopt({"pid": os.getpid(), "create_time": 1.0})
    with pytest.raises(HypervisorError, match="is gone"):
        proc.adopt({"pid": 2**22 + 12345, "create_time": 0.0})


@pytest.fixture
def netns() -> str:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("needs root, ip and nsenter to create a network namespace")
    name = f"kbt-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


async def test_vmm_runs_in_the_given_netns(
    recorder: Recorder, jailer_root: Path, boot_files, netns: str
) -> None:
    config = HypervisorConfig(
        path=str(FAKE_CLH),
        kernel=str(boot_files["vmlinux"]),
        initrd=str(boot_files["initrd.img"]),
        default_memory=256,
        default_maxvcpus=1,
        shared_fs="none",
    )
    vm = CloudHypervisor(config, jailer_root=jailer_root)
    await vm.prepare_vm("netns1", netns=netns)
    await vm.start_vm(30)
    (pid,) = await vm.get_pids()
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    await vm.stop_vm()
    await vm.cleanup()
    assert not alive(pid)


async def test_an_oversized_api_answer_is_refused(jailer_root: Path) -> None:
    sock = jailer_root / "api.sock"
    body = b"[" + b'"x",' * (300 << 10) + b'"x"]'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, str(sock))
    client = ApiClient("test", sock, describe_error=lambda r: r.text)
    try:
        with pytest.raises(HypervisorError, match="answer exceeds 1048576 bytes"):
            await client.request("GET", "/api/v1/vm.info")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
        sock.unlink()
