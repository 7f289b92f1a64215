"""A hostile guest in a real VM: the shipped kernel and initrd with one more initramfs archive
appended (the kernel unpacks concatenated archives in order, and a later file replaces an
earlier one) that puts hostile_guest.py in place of the agent's entry point. /init, the kernel and
the virtio-serial channel are the shipped ones; the host is Kabuto's real runtime, driven through
the Python API (one VM, a misdeed per exec) and the CLI (a sandbox whose set-up is never answered).

For each misdeed: the host's memory stays bounded (tracemalloc's peak, and the process's RSS), the
wait ends at its configured time (request_timeout_ms, 3 s here), the host's event loop never
blocks (a ticker), and the sandbox keeps serving the next call (but after a broken connection).
test_hostile_agent.py has the same misdeeds over a unix socket, with finer cases.
"""

from __future__ import annotations

import contextlib
import re
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from cli_process import Cli
from reliability_support import Figures, LoopWatch, scale
from test_runtime_helpers import assert_nothing_left, busybox_rootfs, require_guest_image, write_bundle

import kabuto as kabuto_api
from kabuto import api
from kabuto.errors import AgentError, KabutoError
from kabuto.image import installed_image
from kabuto.image.cpio import write_newc
from kabuto.image.rootfs import GUEST_PYTHONPATH, PYTHON_VERSION
from kabuto.runtime.sandbox import VMM_EXIT_GRACE

pytestmark = pytest.mark.vm

HERE = Path(__file__).parent
REQUEST_TIMEOUT = 3.0
# scheduling on a loaded 2-core machine
LATENESS = 1.5
# what the host may allocate while one misdeed lasts, beyond what it was told to keep
MEMORY_BOUND = 16 << 20
BOOT_TIMEOUT = 300.0
# `kabuto run --boot-timeout` of the sandbox whose CreateSandbox is never answered
SET_UP_BUDGET = 60.0


@pytest.fixture(scope="module")
def hostile_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A configuration booting the shipped kernel with the shipped initrd plus the hostile overlay."""
    require_guest_image()
    image = installed_image()
    assert image is not None
    directory = tmp_path_factory.mktemp("hostile")
    overlay = directory / "overlay"
    guest = overlay / GUEST_PYTHONPATH
    entry = guest / "kabuto" / "guest" / "__main__.py"
    entry.parent.mkdir(parents=True)
    entry.write_text((HERE / "hostile_guest.py").read_text())
    (guest / "hostile_agent.py").write_text((HERE / "hostile_agent.py").read_text())
    # the image's bytecode is checked by nothing (unchecked-hash): an empty file is refused as
    # bytecode, so Python compiles the replaced source instead
    cached = entry.parent / "__pycache__" / f"__main__.cpython-{PYTHON_VERSION.replace('.', '')}.pyc"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    initrd = directory / "hostile.initrd"
    with initrd.open("wb") as out, image.initrd.open("rb") as shipped:
        while chunk := shipped.read(1 << 20):
            out.write(chunk)
        out.write(b"\0" * (-out.tell() % 512))  # the kernel skips zeros between archives
        write_newc(overlay, out)
    config = directory / "configuration.toml"
    config.write_text(f"""[hypervisor.qemu]
kernel = "{image.kernel}"
initrd = "{initrd}"

[agent.kata]
request_timeout_ms = {int(REQUEST_TIMEOUT * 1000)}
""")
    return config


@contextlib.contextmanager
def bounded(figures: Figures, name: str, limit: float, *, keeps: int = 0) -> Iterator[None]:
    """The misdeed ``name``: its wait within ``limit`` (plus lateness), memory traced, loop watched."""
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    started = time.monotonic()
    try:
        with LoopWatch() as watch:
            yield
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - rss
    figures[name] = {"wait_seconds": round(elapsed, 2), "configured_seconds": limit,
                     "traced_peak_mib": round(peak / 2**20, 2), "rss_growth_mib": round(grown / 2**20, 1),
                     "longest_loop_stall_seconds": round(watch.longest_gap, 3)}
    assert elapsed < limit + LATENESS, f"{name}: the wait took {elapsed:.2f}s, configured {limit:g}s"
    assert peak < MEMORY_BOUND + keeps, f"{name}: traced peak {peak / 2**20:.1f} MiB"
    assert watch.longest_gap < LATENESS, f"{name}: the host's loop stalled {watch.longest_gap:.2f}s"


@contextlib.asynccontextmanager
async def hostile_sandbox(config: Path, state_root: Path) -> AsyncIterator[kabuto_api.AsyncSandbox]:
    async with kabuto_api.AsyncSandbox(config=str(config), state_root=state_root,
                                       boot_timeout=BOOT_TIMEOUT) as sb:
        yield sb


async def still_serves(sb: kabuto_api.AsyncSandbox) -> None:
    result = await sb.run(["ok"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"", b""), result


async def test_hostile_guest_through_the_api(hostile_config: Path, state_root: Path,
                                             monkeypatch: pytest.MonkeyPatch, figures: Figures) -> None:
    bound = scale(4 << 20, 64 << 20)
    monkeypatch.setattr(api, "MAX_CAPTURE_BYTES", bound)
    async with hostile_sandbox(hostile_config, state_root) as sb:
        await still_serves(sb)
        with bounded(figures, "endless stdout", REQUEST_TIMEOUT, keeps=bound), \
                pytest.raises(KabutoError, match=f"stdout of 'endless' exceeds {bound} bytes"):
            await sb.run(["endless"])
        await still_serves(sb)
        with bounded(figures, "more output than asked", 0.0), \
                pytest.raises(AgentError, match=r"ReadStdout sent \d+ bytes, asked \d+"):
            await sb.run(["overread"])
        await still_serves(sb)
        for misdeed in ("silent", "late", "flood"):
            with bounded(figures, f"{misdeed} exec", REQUEST_TIMEOUT), \
                    pytest.raises(AgentError, match=f"no answer within {REQUEST_TIMEOUT:g}s"):
                await sb.run([misdeed])
            await still_serves(sb)
        with bounded(figures, "garbage protobuf", 0.0), pytest.raises(AgentError, match="ExecProcess"):
            await sb.run(["garbage"])
        await still_serves(sb)
        # last: it breaks the connection, and every later call on it says why; a broken agent
        # connection gives the VMM VMM_EXIT_GRACE to be seen gone (a dying VM is then named)
        with bounded(figures, "oversized frame", VMM_EXIT_GRACE), \
                pytest.raises(AgentError, match="over the 4194304-byte limit"):
            await sb.run(["huge-frame"])
    assert_nothing_left(state_root)


def test_hostile_guest_never_answering_the_set_up(hostile_config: Path, state_root: Path, tmp_path: Path,
                                                  figures: Figures) -> None:
    """`kabuto run` of a sandbox whose CreateSandbox the guest never answers: one line naming the
    call and its bound, exit 1, nothing left."""
    bundle = write_bundle(tmp_path / "bundle", busybox_rootfs(tmp_path / "rootfs"), ["true"])
    run = Cli(state_root, "--config", str(hostile_config), "run", "--boot-timeout", str(SET_UP_BUDGET),
              "--bundle", str(bundle), "silent-setup")
    try:
        started = time.monotonic()
        code = run.wait(BOOT_TIMEOUT)
        figures["seconds_to_fail_with_boot"] = round(time.monotonic() - started, 1)
        out, err = run.output()
    finally:
        run.close()
    assert (code, out) == (1, b""), (code, out, err)
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "CreateSandbox" in lines[0], err
    # the first call may wait what is left of the boot's budget for a guest service still loading,
    # never less than one call's bound
    waited = re.search(r"no answer within ([0-9.]+)s", lines[0])
    assert waited is not None and REQUEST_TIMEOUT <= float(waited.group(1)) <= SET_UP_BUDGET, err
    figures["message"] = lines[0]
    assert_nothing_left(state_root)
