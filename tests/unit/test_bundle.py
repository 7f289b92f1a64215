"""OCI bundle checks: what runc refuses, Kabuto refuses with a message naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kabuto.runtime.bundle import (
    BundleError,
    ContainerIdError,
    check_container_id,
    default_spec,
    load_bundle,
    process_spec,
)


def write_bundle(directory: Path, spec: dict[str, Any] | str, rootfs: bool = True) -> Path:
    if rootfs:
        (directory / "rootfs").mkdir(exist_ok=True)
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (directory / "config.json").write_text(text)
    return directory


def test_default_spec_matches_runc_spec_shape(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path, default_spec(["echo", "hi"])))
    assert bundle.spec["process"]["args"] == ["echo", "hi"]
    assert bundle.rootfs == tmp_path / "rootfs"
    assert bundle.readonly_root is True
    assert bundle.hostname == "runc"


def test_runc_generated_spec_is_accepted(tmp_path: Path) -> None:
    import shutil
    import subprocess

    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    subprocess.run([runc, "spec"], cwd=tmp_path, check=True)
    (tmp_path / "rootfs").mkdir()
    bundle = load_bundle(tmp_path)
    assert bundle.spec["process"]["args"] == ["sh"]


def test_guest_spec_rewrites_root_and_drops_cgroups_path(tmp_path: Path) -> None:
    spec = default_spec(["true"])
    spec["linux"]["cgroupsPath"] = "/host/placement"
    bundle = load_bundle(write_bundle(tmp_path, spec))
    guest = bundle.guest_spec("/run/kabuto/shared/c1/rootfs")
    assert guest["root"] == {"path": "/run/kabuto/shared/c1/rootfs", "readonly": True}
    assert "cgroupsPath" not in guest["linux"]
    assert bundle.spec["linux"]["cgroupsPath"] == "/host/placement"


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"config\.json not found"):
        load_bundle(tmp_path)


def test_missing_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(write_bundle(tmp_path, "{not json"))


def test_missing_rootfs(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"rootfs \(.*rootfs\) does not exist"):
        load_bundle(write_bundle(tmp_path, default_spec(["true"]), rootfs=False))


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    spec = default_spec(["true"])
    spec["annotations"] = {"big": "x" * (5 * 1024 * 1024)}
    with pytest.raises(BundleError, match="larger than"):
        load_bundle(write_bundle(tmp_path, spec))


def _mutated(change: Any) -> dict[str, Any]:
    spec = default_spec(["true"])
    change(spec)
    return spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("ociVersion"), "ociVersion"),
        (lambda s: s.update(ociVersion="2.0.0"), "unsupported version"),
        (lambda s: s.pop("process"), "process"),
        (lambda s: s["process"].update(args=[]), "process.args"),
        (lambda s: s["process"].update(args=["ok", 3]), "process.args"),
        (lambda s: s["process"].update(cwd="relative"), "process.cwd"),
        (lambda s: s["process"].update(env=["NOEQUALS"]), "process.env"),
        (lambda s: s["process"]["user"].update(uid=-1), "process.user.uid"),
        (lambda s: s["process"]["user"].update(uid=True), "process.user.uid"),
        (lambda s: s["process"]["rlimits"].append({"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}),
         "unknown rlimit type"),
        (lambda s: s["process"]["rlimits"].__setitem__(0, {"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}),
         "exceeds hard limit"),
        (lambda s: s["root"].update(path=""), "root.path"),
        (lambda s: s.update(hooks={"prestart": [{"path": "/bin/true"}]}), "hooks"),
        (lambda s: s["linux"].update(seccomp="SCMP_ACT_ALLOW"), "linux.seccomp"),
        (lambda s: s["linux"].update(uidMappings=[{"containerID": 0, "hostID": 1000, "size": 1}]),
         "linux.uidMappings: mappings need a user namespace"),
        (lambda s: s["linux"]["namespaces"].append({"type": "user"}),
         "linux.uidMappings: a user namespace .* needs mappings"),
        (lambda s: s["linux"]["namespaces"].append({"type": "user", "path": "/proc/1/ns/user"}),
         "joining a host user namespace"),
        (lambda s: s["linux"]["namespaces"].__setitem__(4, {"type": "mount", "path": "/proc/1/ns/mnt"}),
         "joining a host mount namespace"),
        (lambda s: s["linux"]["namespaces"].__setitem__(1, {"type": "network", "path": "run/netns/x"}),
         r"linux.namespaces\[1\].path: must be an absolute path"),
        (lambda s: s["linux"]["namespaces"].append({"type": "bogus"}), "unknown namespace"),
        (lambda s: s.update(windows={}), "windows"),
        (lambda s: s["mounts"].append({"destination": "relative", "type": "tmpfs"}), "absolute path"),
        (lambda s: s.update(annotations={"a": 1}), "annotations"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, change: Any, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        load_bundle(write_bundle(tmp_path, _mutated(change)))


@pytest.mark.parametrize("good", ["a", "c1", "my.container_1+x-y", "A" * 64])
def test_container_ids_accepted(good: str) -> None:
    assert check_container_id(good) == good


@pytest.mark.parametrize("bad", ["", ".hidden", "-x", "a/b", "a b", "A" * 65, "..", "é"])
def test_container_ids_refused(bad: str) -> None:
    with pytest.raises(ContainerIdError, match="invalid container id"):
        check_container_id(bad)


def test_process_spec_inherits_and_overrides() -> None:
    base = default_spec(["sleep"])["process"]
    base["env"] = ["PATH=/bin", "A=1"]
    process = process_spec(["ls", "-l"], base, env=["A=2", "B=3"], cwd="/tmp")
    assert process["args"] == ["ls", "-l"]
    assert process["env"] == ["PATH=/bin", "A=2", "B=3"]
    assert process["cwd"] == "/tmp"
    assert process["user"] == base["user"]
    assert base["env"] == ["PATH=/bin", "A=1"]


@pytest.mark.parametrize(("args", "kwargs"), [([], {}), (["ls"], {"env": ["X"]}), (["ls"], {"cwd": "tmp"})])
def test_process_spec_refuses_bad_exec(args: list[str], kwargs: dict[str, Any]) -> None:
    with pytest.raises(BundleError):
        process_spec(args, default_spec(["sh"])["process"], **kwargs)
