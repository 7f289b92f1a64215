"""kabuto.Sandbox against real QEMU: one VM for run, streams, stdin, copies, several processes.

Sandbox drives AsyncSandbox on its own loop thread, so these cover the async API as well
(a second VM only for AsyncSandbox would cost a TCG boot and show nothing new).
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_runtime_helpers import require_guest_image, state_root_fixture

import kabuto
from kabuto.errors import KabutoError

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rw, ro = tmp_path_factory.mktemp("rw"), tmp_path_factory.mktemp("ro")
    (ro / "kept").write_text("from the host\n")
    return rw, ro


@pytest.fixture(scope="module")
def sandbox(state_root: Path, shared: tuple[Path, Path]) -> Iterator[kabuto.Sandbox]:
    require_guest_image()
    rw, ro = shared
    with kabuto.Sandbox(hypervisor="qemu", state_root=state_root, binds={"/rw": rw},
                        readonly_binds={"/ro": ro}) as sb:
        yield sb


def test_binds_reach_the_container(sandbox: kabuto.Sandbox, shared: tuple[Path, Path]) -> None:
    rw, ro = shared
    result = sandbox.run(["sh", "-c", "echo written > /rw/out; cat /ro/kept; "
                                      "echo x 2>/dev/null > /ro/kept || echo ro-refused"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"from the host\nro-refused\n"
    assert (rw / "out").read_text() == "written\n"
    assert (ro / "kept").read_text() == "from the host\n"


def test_run_shows_the_guest_kernel(sandbox: kabuto.Sandbox) -> None:
    result = sandbox.run(["uname", "-r"])
    assert result.exit_code == 0 and result.stderr == b""
    release = result.stdout.decode().strip()
    assert release and release != platform.release()


def test_run_separates_streams_and_reports_exit_codes(sandbox: kabuto.Sandbox) -> None:
    result = sandbox.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    assert sandbox.run(["sh", "-c", "kill -KILL $$"]).exit_code == 137
    # like subprocess.run: a command that cannot start raises, naming it
    with pytest.raises(KabutoError, match="no-such-binary"):
        sandbox.run(["no-such-binary"])


def test_stdin_env_and_cwd(sandbox: kabuto.Sandbox) -> None:
    data = bytes(range(256)) * 1000
    assert sandbox.run(["cat"], stdin=data).stdout == data
    result = sandbox.run(["sh", "-c", "echo $A; pwd"], env=["A=from-api"], cwd="/tmp")
    assert result.stdout == b"from-api\n/tmp\n"


def test_stream_yields_chunks_then_exit(sandbox: kabuto.Sandbox) -> None:
    items = list(sandbox.stream(["sh", "-c", "echo one; echo two >&2; echo three"]))
    assert items[-1] == ("exit", 0)
    stdout = b"".join(chunk for name, chunk in items if name == "stdout")  # type: ignore[misc]
    stderr = b"".join(chunk for name, chunk in items if name == "stderr")  # type: ignore[misc]
    assert (stdout, stderr) == (b"one\nthree\n", b"two\n")


def test_copy_in_and_out(sandbox: kabuto.Sandbox, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 9000  # more than one 1 MiB chunk
    sandbox.copy_in(payload, "/tmp/payload.bin")
    assert sandbox.run(["wc", "-c", "/tmp/payload.bin"]).stdout.split()[0] == str(len(payload)).encode()
    assert sandbox.copy_out("/tmp/payload.bin") == payload
    host_file = tmp_path / "script.sh"
    host_file.write_text("#!/bin/sh\necho from a copied script\n")
    sandbox.copy_in(host_file, "/tmp/script.sh", mode=0o755)
    assert sandbox.run(["/tmp/script.sh"]).stdout == b"from a copied script\n"
    with pytest.raises(KabutoError):
        sandbox.copy_out("/tmp/does-not-exist")


def test_several_processes_at_once(sandbox: kabuto.Sandbox) -> None:
    sleeper = sandbox.spawn(["sh", "-c", "trap 'echo bye; exit 9' TERM; while :; do sleep 0.2; done"])
    results: dict[int, kabuto.RunResult] = {}

    def worker(index: int) -> None:
        results[index] = sandbox.run(["sh", "-c", f"echo worker {index}"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"worker {i}\n".encode() for i in range(3)}
    sleeper.kill()
    assert sleeper.wait() == kabuto.RunResult(b"bye\n", b"", 9)


def test_timeout_kills_the_process(sandbox: kabuto.Sandbox) -> None:
    result = sandbox.run(["sleep", "60"], timeout=2)
    assert result.exit_code == 137

