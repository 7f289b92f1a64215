"""virtio-fs gone wrong, through the CLI with QEMU and Debian's virtiofsd in real VMs: a daemon
that is missing, one killed while the VM boots, one killed under a running container (detached,
and under a streaming `kabuto run`), a bind mount whose host directory is gone. Each is an error
naming it, and nothing is left: no QEMU, no virtiofsd, no socket, mount or directory (the
state_root fixture checks)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_runtime_helpers import (
    CLI_TIMEOUT,
    KABUTO,
    busybox_rootfs,
    kabuto,
    require_guest_image,
    state_root_fixture,
    write_bundle,
)

from kabuto.config.loader import builtin_default_text

pytestmark = pytest.mark.vm

DEBIAN_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# Debian's virtiofsd, SIGKILLed a second after its socket appeared: QEMU is starting or the guest
# booting then (a TCG boot takes several seconds). It is the daemon itself that dies: the script
# execs it, and a background shell waits for the socket and kills it.
DYING_VIRTIOFSD = f"""#!/bin/sh
[ "$1" = --help ] && exec {DEBIAN_VIRTIOFSD} --help
for arg in "$@"; do case "$arg" in --socket-path=*) socket="${{arg#--socket-path=}}";; esac; done
(while [ ! -S "$socket" ]; do sleep 0.05; done; sleep 1; kill -9 $$) &
exec {DEBIAN_VIRTIOFSD} "$@"
"""
EXIT_WAIT = 10.0


@pytest.fixture
def state_root() -> Iterator[Path]:
    yield from state_root_fixture()


def config_with(tmp_path: Path, dropin: str) -> Path:
    config = tmp_path / "configuration.toml"
    config.write_text(builtin_default_text())
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-virtiofsd.toml").write_text(dropin)
    return config


def virtiofsds(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "virtiofsd" and str(root) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_missing_virtiofsd_is_named_before_anything_starts(state_root: Path, tmp_path: Path) -> None:
    config = config_with(tmp_path, '[hypervisor.qemu]\nvirtio_fs_daemon = "/usr/lib/qemu/no-virtiofsd"\n')
    result = kabuto(state_root, "--config", str(config), "run", "--busybox", "--", "true")
    assert result.returncode != 0
    assert "hypervisor.qemu.virtio_fs_daemon = '/usr/lib/qemu/no-virtiofsd': does not exist" in \
        result.stderr.decode(errors="replace")


def test_virtiofsd_killed_while_the_vm_boots(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    daemon = tmp_path / "virtiofsd"
    daemon.write_text(DYING_VIRTIOFSD)
    daemon.chmod(0o755)
    config = config_with(tmp_path, f'[hypervisor.qemu]\nvirtio_fs_daemon = "{daemon}"\n'
                                   f'valid_virtio_fs_daemon_paths = ["{daemon}"]\n')
    result = kabuto(state_root, "--config", str(config), "run", "--busybox", "--", "true")
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0, stderr
    assert "the virtiofsd of share 'kabuto-shared' was killed by signal 9" in stderr, stderr
    assert not virtiofsds(state_root)


def test_virtiofsd_killed_under_a_running_container(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    bundle = write_bundle(tmp_path / "bundle", busybox_rootfs(tmp_path / "rootfs"), ["sleep", "600"])
    kabuto(state_root, "create", "--bundle", str(bundle), "c1", check=True)
    kabuto(state_root, "start", "c1", check=True)
    (daemon,) = virtiofsds(state_root)
    daemon.kill()
    daemon.wait(EXIT_WAIT)
    # the next command that looks finds the share gone, says so and stops the VM
    result = kabuto(state_root, "state", "c1", check=True)
    assert json.loads(result.stdout)["status"] == "stopped"
    assert "the virtiofsd of share 'kabuto-shared' is gone" in result.stderr.decode(errors="replace")
    # ... and QEMU is gone with it
    assert not [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and p.info["cmdline"][0].endswith("qemu-system-x86_64")
                and str(state_root) in " ".join(p.info["cmdline"])]
    kabuto(state_root, "delete", "c1", check=True)


def test_virtiofsd_killed_under_a_streaming_run(state_root: Path) -> None:
    """The process that started the VM (here `kabuto run`, streaming) stops it at once."""
    require_guest_image()
    run = subprocess.Popen([str(KABUTO), "run", "--busybox", "--", "sh", "-c", "echo up; sleep 300"],
                           env={**os.environ, "KABUTO_STATE_ROOT": str(state_root)},
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout is not None
        assert run.stdout.readline() == b"up\n"
        (daemon,) = virtiofsds(state_root)
        daemon.kill()
        _, stderr = run.communicate(timeout=CLI_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    assert b"the virtiofsd of share 'kabuto-shared' was killed by signal 9" in stderr, stderr


def test_a_bind_mount_whose_host_directory_vanished(state_root: Path, tmp_path: Path) -> None:
    require_guest_image()
    gone = tmp_path / "gone"
    mount = {"destination": "/data", "type": "bind", "source": str(gone), "options": ["rbind", "rw"]}
    bundle = write_bundle(tmp_path / "bundle", busybox_rootfs(tmp_path / "rootfs"), ["true"],
                          change=lambda spec: spec["mounts"].append(mount))
    result = kabuto(state_root, "run", "--bundle", str(bundle), "c2")
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert str(gone) in stderr, stderr
