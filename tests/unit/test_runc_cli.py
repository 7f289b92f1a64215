"""runc's global options and self-description verbs, with runc itself as the oracle: the same
command under both, compared by exit code and shape (no VM is booted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kabuto.guest.containers import spec as guest_spec
from kabuto.runtime import features
from kabuto.runtime.cgroups_path import CgroupsPathError, host_cgroup

KABUTO = Path(sys.executable).parent / "kabuto"
RUNC = shutil.which("runc")
needs_runc = pytest.mark.skipif(RUNC is None, reason="runc is not installed (apt-get install runc)")


def both(tmp_path: Path, *args: str, cwd: Path | None = None) -> dict[str, subprocess.CompletedProcess[str]]:
    """``args`` under runc and kabuto, each with a state root of its own; {{root}} and {{log}}
    in an argument become that runtime's."""
    results = {}
    for name, binary in (("runc", RUNC), ("kabuto", str(KABUTO))):
        base = tmp_path / name
        base.mkdir(exist_ok=True)
        argv = [a.replace("{root}", str(base / "root")).replace("{log}", str(base / "log")) for a in args]
        results[name] = subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=60,
                                       cwd=cwd or base)
    return results


@needs_runc
def test_version_lines_like_runcs(tmp_path: Path) -> None:
    result = both(tmp_path, "--version")
    for name, run in result.items():
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith(f"{name} version ")
        assert any(line.startswith("spec: 1.0.") for line in lines), lines
    assert both(tmp_path, "-v")["kabuto"].stdout == result["kabuto"].stdout


@needs_runc
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_an_error_goes_to_the_log_file_as_runc_writes_it(tmp_path: Path, fmt: str) -> None:
    result = both(tmp_path, "--root", "{root}", "--log", "{log}", "--log-format", fmt, "delete", "nosuch")
    lines = {}
    for name, run in result.items():
        assert run.returncode == 1
        log = (tmp_path / name / "log").read_text().splitlines()
        assert len(log) == 1, log
        lines[name] = log[0]
        assert run.stderr.strip(), "the error is also on stderr"
    if fmt == "json":
        runc, ours = (json.loads(lines[n]) for n in ("runc", "kabuto"))
        assert list(ours) == list(runc) == ["level", "msg", "time"]
        assert ours["level"] == runc["level"] == "error"
        assert "does not exist" in ours["msg"] and "does not exist" in runc["msg"]
        assert len(ours["time"]) == len(runc["time"]) and ours["time"].endswith("Z")
    else:
        for line in lines.values():
            assert line.startswith('time="') and ' level=error msg="' in line, line


@needs_runc
def test_json_errors_on_stderr_without_a_log_file(tmp_path: Path) -> None:
    result = both(tmp_path, "--root", "{root}", "--log-format", "json", "state", "nosuch")
    for run in result.values():
        assert run.returncode == 1
        assert json.loads(run.stderr.splitlines()[-1])["level"] == "error"


@needs_runc
@pytest.mark.parametrize("args", [["--log-format", "xml", "list"], ["--no-such-flag", "list"],
                                  ["--root", "{root}", "delete"], ["--root", "{root}", "kill"],
                                  ["--root", "{root}", "events", "--interval", "1", "c1"]])  # a Go duration
def test_refused_alike(tmp_path: Path, args: list[str]) -> None:
    result = both(tmp_path, *args)
    assert result["runc"].returncode != 0 and result["kabuto"].returncode != 0, result
    assert not (tmp_path / "kabuto" / "root").exists()


@pytest.mark.parametrize("verb", ["checkpoint", "restore"])
def test_checkpoint_and_restore_are_refused_by_name(tmp_path: Path, verb: str) -> None:
    run = subprocess.run([str(KABUTO), "--root", str(tmp_path / "root"), "--log", str(tmp_path / "log"),
                          "--log-format", "json", verb, "--image-path", str(tmp_path / "img"), "c1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    line = json.loads((tmp_path / "log").read_text().splitlines()[-1])
    assert line["level"] == "error" and line["msg"].startswith(f"{verb} is not supported: runc dumps"), line
    assert not (tmp_path / "root").exists() and not (tmp_path / "img").exists()


@needs_runc
def test_force_delete_of_an_unknown_container_succeeds_as_in_runc(tmp_path: Path) -> None:
    result = both(tmp_path, "--root", "{root}", "delete", "--force", "nosuch")
    assert result["runc"].returncode == result["kabuto"].returncode == 0, result
    assert both(tmp_path, "--root", "{root}", "delete", "nosuch")["kabuto"].returncode == 1


@needs_runc
def test_global_root_is_the_state_root(tmp_path: Path) -> None:
    result = both(tmp_path, "--root", "{root}", "list", "--format", "json")
    for run in result.values():
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) in ([], None)


@needs_runc
def test_spec_writes_runcs_default_spec(tmp_path: Path) -> None:
    result = both(tmp_path, "spec")
    for run in result.values():
        assert run.returncode == 0, run.stderr
    runc, ours = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("runc", "kabuto"))
    assert ours == runc
    again = both(tmp_path, "spec")
    for run in again.values():
        assert run.returncode == 1 and "exists" in run.stderr
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert subprocess.run([KABUTO, "spec", "--bundle", str(bundle)], timeout=60).returncode == 0
    assert json.loads((bundle / "config.json").read_text()) == runc


@needs_runc
def test_features_in_runcs_shape(tmp_path: Path) -> None:
    result = both(tmp_path, "features")
    runc, ours = (json.loads(result[n].stdout) for n in ("runc", "kabuto"))
    assert set(ours) == set(runc)
    assert set(ours["linux"]) == set(runc["linux"])
    assert set(ours["linux"]["cgroup"]) == set(runc["linux"]["cgroup"])
    assert ours["ociVersionMin"] == runc["ociVersionMin"]
    # where Kabuto names a value, runc knows it too
    assert set(ours["linux"]["namespaces"]) <= set(runc["linux"]["namespaces"])
    assert set(ours["linux"]["capabilities"]) <= set(runc["linux"]["capabilities"])
    assert set(ours["mountOptions"]) <= set(runc["mountOptions"])
    assert ours["hooks"] == []


def test_features_say_what_the_guest_applies() -> None:
    assert features.CAPABILITIES == guest_spec.CAPABILITIES
    assert set(features.MOUNT_OPTIONS) == set(guest_spec.MOUNT_FLAGS) | set(guest_spec.PROPAGATION_FLAGS)
    assert set(features.NAMESPACES) == set(guest_spec.NAMESPACE_FLAGS) | {"network"}


def test_systemd_cgroups_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    from kabuto.runtime import cgroups_path

    assert host_cgroup("/a/b", systemd=False) == "/a/b"
    monkeypatch.setattr(cgroups_path, "systemd_running", lambda: True)
    assert host_cgroup("machine-libpod.slice:libpod:abc", systemd=True) == \
        "/machine.slice/machine-libpod.slice/libpod-abc.scope"
    assert host_cgroup(":runc:1", systemd=True) == "/system.slice/runc-1.scope"
    for bad in ("/a/b", "a.slice:x", "bad:x:y", "a--b.slice:x:y"):
        with pytest.raises(CgroupsPathError):
            host_cgroup(bad, systemd=True)
    monkeypatch.setattr(cgroups_path, "systemd_running", lambda: False)
    assert host_cgroup("system.slice:runc:1", systemd=True) == "/system.slice/runc-1"
