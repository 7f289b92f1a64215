"""The guest's reading of OCI configs and its process helpers, without namespaces or root."""

from __future__ import annotations

import json
import re
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from kabuto.guest.containers import launcher
from kabuto.guest.containers import syscalls as sc
from kabuto.guest.containers.processes import exit_status
from kabuto.guest.containers.spec import (
    CAPABILITY_NUMBERS,
    SpecError,
    check_id,
    parse_mount_options,
    parse_process,
    parse_resources,
    parse_spec,
    shares_to_weight,
)


def minimal(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "root": {"path": "/run/kabuto/shared/c1/rootfs"},
        "process": {"args": ["sh"], "cwd": "/"},
    }
    config.update(extra)
    return config


def with_user_namespace(uid: list[Any] | None = None, gid: list[Any] | None = None,
                        user: dict[str, Any] | None = None) -> dict[str, Any]:
    config = minimal(linux={
        "namespaces": [{"type": "user"}],
        "uidMappings": uid or [{"containerID": 0, "hostID": 1000, "size": 10}],
        "gidMappings": gid or [{"containerID": 0, "hostID": 1000, "size": 10}],
    })
    if user is not None:
        config["process"]["user"] = user
    return config


def parse(config: dict[str, Any]) -> Any:
    return parse_spec(json.dumps(config).encode())


def test_a_minimal_config_gets_a_mount_namespace_and_defaults() -> None:
    spec = parse(minimal())
    assert spec.namespaces == sc.CLONE_NEWNS
    assert spec.process.args == ("sh",)
    assert spec.process.user.uid == 0 and spec.process.capabilities is None
    assert spec.readonly_root is False and spec.hostname is None


def test_unknown_properties_are_ignored_as_the_oci_spec_requires() -> None:
    spec = parse(minimal(somethingNew={"x": 1}, annotations={"a": "b"}))
    assert spec.process.args == ("sh",)


def test_namespaces_network_is_shared_and_others_map_to_clone_flags() -> None:
    names = ["pid", "network", "ipc", "uts", "mount", "cgroup"]
    spec = parse(minimal(linux={"namespaces": [{"type": n} for n in names]}))
    expected = sc.CLONE_NEWPID | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWNS | sc.CLONE_NEWCGROUP
    assert spec.namespaces == expected


def test_container_paths_join_that_containers_ipc_uts_and_pid() -> None:
    namespaces = [{"type": t, "path": "container:sandbox-1"} for t in ("ipc", "uts", "pid")]
    spec = parse(minimal(hostname="pod", linux={"namespaces": [{"type": "mount"}, *namespaces]}))
    assert spec.namespaces == sc.CLONE_NEWNS
    assert spec.joined == ((sc.CLONE_NEWIPC, "sandbox-1"), (sc.CLONE_NEWUTS, "sandbox-1"),
                           (sc.CLONE_NEWPID, "sandbox-1"))  # fmt: skip
    assert spec.entered == sc.CLONE_NEWNS | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWPID
    assert spec.hostname == "pod"


def test_a_network_namespace_path_still_means_the_guests_network() -> None:
    spec = parse(minimal(linux={"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1234"}]}))
    assert spec.namespaces == sc.CLONE_NEWNS


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (minimal(hooks={"prestart": [{"path": "/x"}]}), "hooks"),
        (minimal(linux={"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}), "linux.seccomp"),
        (minimal(linux={"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]}),
         "need a user namespace"),
        (minimal(linux={"namespaces": [{"type": "user"}]}), "needs linux.uidMappings and linux.gidMappings"),
        (with_user_namespace(uid=[{"containerID": 0, "hostID": 1000, "size": 0}]),
         r"uidMappings\[0\].size = 0"),
        (with_user_namespace(uid=[{"containerID": 0, "hostID": 1000}]), r"uidMappings\[0\].size must be"),
        (with_user_namespace(gid=[{"containerID": 4294967295, "hostID": 0, "size": 2}]),
         r"gidMappings\[0\]: containerID 4294967295 \+ size 2 passes"),
        (with_user_namespace(uid=[{"containerID": 0, "hostID": 1000, "size": 10},
                                  {"containerID": 20, "hostID": 1005, "size": 10}]),
         r"uidMappings\[0\] and \[1\] overlap"),
        (with_user_namespace(uid=[{"containerID": i, "hostID": 4000000000 + i, "size": 1}
                                  for i in range(300)]),
         "the kernel takes fewer than 4096"),
        (with_user_namespace(user={"uid": 10, "gid": 0}), "process.user.uid 10 is not mapped"),
        (with_user_namespace(user={"uid": 0, "gid": 0, "additionalGids": [99]}),
         "process.user.additionalGids 99 is not mapped"),
        (minimal(linux={"namespaces": [{"type": "user", "path": "container:a"}]}), "by path"),
        (minimal(linux={"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}), "by path"),
        (minimal(linux={"namespaces": [{"type": "cgroup", "path": "container:a"}]}), "by path"),
        (minimal(linux={"namespaces": [{"type": "ipc"}, {"type": "ipc", "path": "container:a"}]}),
         "both joined and new"),
        (minimal(hostname="h"), "private UTS namespace"),
        (minimal(mounts=[{"destination": "/x", "type": "nfs", "source": "h:/"}]), "'nfs' is not supported"),
        (minimal(mounts=[{"destination": "x", "type": "tmpfs"}]), "absolute"),
        (minimal(linux={"rootfsPropagation": "sideways"}), "propagation"),
        (minimal(linux={"sysctl": {"../../etc": "1"}}), "not a sysctl"),
        ({"root": {"path": "/r"}}, "process is missing"),
        ({"process": {"args": ["sh"]}}, "root.path"),
        (minimal(root={"path": "relative"}), "absolute path"),
    ],
)
def test_refused_configs_name_the_field(config: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(config)
    assert re.search(message, str(info.value)), (message, str(info.value))


def test_a_user_namespace_and_its_mappings() -> None:
    spec = parse(with_user_namespace(uid=[{"containerID": 0, "hostID": 100000, "size": 65536}]))
    assert spec.namespaces & sc.CLONE_NEWUSER and spec.entered & sc.CLONE_NEWUSER
    assert [m.line() for m in spec.uid_mappings] == ["0 100000 65536\n"]
    assert [m.line() for m in spec.gid_mappings] == ["0 1000 10\n"]


def test_invalid_and_oversized_json() -> None:
    with pytest.raises(SpecError, match="invalid"):
        parse_spec(b"{")
    with pytest.raises(SpecError, match="at most"):
        parse_spec(b" " * (2 << 20))
    with pytest.raises(SpecError, match="must be an object"):
        parse_spec(b"[]")


@pytest.mark.parametrize(
    ("process", "message"),
    [
        ({"args": []}, "args must name"),
        ({"args": ["sh"], "env": ["NOEQUALS"]}, "NAME=VALUE"),
        ({"args": ["sh"], "env": ["=value"]}, "NAME=VALUE"),
        ({"args": ["sh"], "user": {"uid": -1}}, "out of range"),
        ({"args": ["sh"], "user": {"uid": "root"}}, "integer"),
        ({"args": ["sh"], "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]}, "exceeds"),
        ({"args": ["sh"], "capabilities": {"bounding": ["CAP_FLY"]}}, "CAP_FLY"),
        ({"args": ["sh"], "apparmorProfile": "docker-default"}, "AppArmor"),
        ({"args": ["sh"], "terminal": "yes"}, "true or false"),
        ({"args": ["a\0b"]}, "NUL"),
    ],
)
def test_refused_processes(process: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_process(process)
    assert message in str(info.value)


def test_process_fields() -> None:
    process = parse_process(
        {
            "args": ["sh", "-c", "true"],
            "env": ["A=1", "A=2", "B=x=y"],
            "cwd": "/work",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [5], "umask": 0o27},
            "terminal": True,
            "consoleSize": {"height": 24, "width": 80},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                {"type": "RLIMIT_CORE", "soft": 2**64 - 1, "hard": 2**64 - 1},
            ],
            "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "ambient": ["CAP_KILL"]},
            "noNewPrivileges": True,
            "oomScoreAdj": 500,
        }
    )
    assert process.env_value("A") == "2" and process.env_value("B") == "x=y"
    assert launcher.environment(process)["A"] == "2"
    assert process.user.additional_gids == (5,) and process.user.umask == 0o27
    assert process.console_size == (24, 80)
    assert [(r.soft, r.hard) for r in process.rlimits] == [(1024, 4096), (resource.RLIM_INFINITY,) * 2]
    assert process.capabilities is not None
    assert process.capabilities.bounding == {CAPABILITY_NUMBERS["CAP_KILL"], CAPABILITY_NUMBERS["CAP_CHOWN"]}
    assert process.no_new_privileges and process.oom_score_adj == 500


def test_mount_options_split_into_flags_propagation_and_data() -> None:
    flags, propagation, data = parse_mount_options(
        ["nosuid", "ro", "rw", "noexec", "rslave", "mode=755", "size=1m"], "options"
    )
    assert flags == sc.MS_NOSUID | sc.MS_NOEXEC
    assert propagation == sc.MS_SLAVE | sc.MS_REC
    assert data == "mode=755,size=1m"
    flags, _, _ = parse_mount_options(["rbind"], "options")
    assert flags == sc.MS_BIND | sc.MS_REC


def test_resources_become_cgroup_v2_files() -> None:
    resources = parse_resources(
        {
            "memory": {"limit": 100 << 20, "reservation": 50 << 20, "swap": 150 << 20},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1"},
            "pids": {"limit": 64},
            "devices": [{"allow": False, "access": "rwm"}],
            "unified": {"io.weight": "50"},
        }
    )
    assert dict(resources.files) == {
        "memory.max": str(100 << 20),
        "memory.low": str(50 << 20),
        "memory.swap.max": str(50 << 20),
        "cpu.weight": str(shares_to_weight(1024)),
        "cpu.max": "50000 100000",
        "cpuset.cpus": "0-1",
        "pids.max": "64",
        "io.weight": "50",
    }
    assert shares_to_weight(2) == 1 and shares_to_weight(262144) == 10000
    assert parse_resources({"devices": [{"allow": False, "access": "rwm"}]}).files == ()
    for bad, message in (
        ({"memory": {"kernel": 1}}, "cgroup v2 has no such limit"),
        ({"blockIO": {"weight": 10}}, "blockIO"),
        ({"unified": {"cgroup.procs": "1"}}, "not a controller file"),
        ({"memory": {"swap": 10}}, "memory.limit"),
    ):
        with pytest.raises(SpecError, match=message):
            parse_resources(bad)


@pytest.mark.parametrize("good", ["c1", "my_container-1.2", "a" * 128, "+x"])
def test_good_ids(good: str) -> None:
    assert check_id(good, "container id") == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a" * 129, "sp ace", "é"])
def test_bad_ids(bad: str) -> None:
    with pytest.raises(SpecError):
        check_id(bad, "container id")


def test_exit_status_is_what_a_shell_reports() -> None:
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137
    assert exit_status(signal.SIGTERM) == 143


def test_secure_join_keeps_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "rel").symlink_to("../../../../etc")
    (root / "loop").symlink_to("loop")
    assert launcher.secure_join(str(root), "/abs/passwd") == str(root / "etc/passwd")
    assert launcher.secure_join(str(root), "/rel/passwd") == str(root / "etc/passwd")
    assert launcher.secure_join(str(root), "/../../x") == str(root / "x")
    with pytest.raises(launcher.LaunchError, match="too many symbolic links"):
        launcher.secure_join(str(root), "/loop/x")


def test_look_path_matches_runc_messages(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    (bin_dir / "data").write_text("")
    assert launcher.look_path("prog", f"/nonexistent:{bin_dir}") == str(program)
    assert launcher.look_path(str(program), None) == str(program)
    with pytest.raises(launcher.LaunchError, match=r'^exec: "nosuch": executable file not found in \$PATH$'):
        launcher.look_path("nosuch", str(bin_dir))
    with pytest.raises(launcher.LaunchError, match=r'^exec: "prog": executable file not found in \$PATH$'):
        launcher.look_path("prog", None)
    missing = f"{bin_dir}/missing"
    with pytest.raises(
        launcher.LaunchError, match=f'^exec: "{missing}": stat {missing}: no such file or directory$'
    ):
        launcher.look_path(missing, None)
    with pytest.raises(launcher.LaunchError, match="permission denied"):
        launcher.look_path(str(bin_dir / "data"), None)
    with pytest.raises(launcher.LaunchError, match="permission denied"):
        launcher.look_path(str(bin_dir), None)


def test_home_comes_from_passwd_else_root(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\nbroken\nu:x:1000:1000::/home/u:/bin/sh\n")
    assert launcher.home_of(1000, str(passwd)) == "/home/u"
    assert launcher.home_of(0, str(passwd)) == "/root"
    assert launcher.home_of(2000, str(passwd)) == "/"
    assert launcher.home_of(0, str(tmp_path / "missing")) == "/"


def test_syscall_errors_name_the_call() -> None:
    with pytest.raises(OSError, match="umount /nonexistent-kabuto-path") as info:
        sc.umount2("/nonexistent-kabuto-path")
    assert info.value.errno
