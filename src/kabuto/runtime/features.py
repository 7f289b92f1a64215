"""``kabuto features``: what this runtime supports, in the JSON shape ``runc features`` prints
(opencontainers/runtime-spec features.md), saying what Kabuto does rather than what runc does.

The lists mirror the guest's tables (kabuto.guest.containers.spec), which the host side may not
import; tests/unit/test_runc_cli.py checks that they agree.
"""

from __future__ import annotations

from typing import Any

OCI_VERSION_MIN = "1.0.0"

# mount options the guest applies (flags, propagation); any other option is passed to the
# filesystem as data, as runc does
MOUNT_OPTIONS = sorted({
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand", "noatime", "nodev",
    "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime", "nosuid", "nosymfollow", "rbind",
    "relatime", "ro", "rw", "strictatime", "suid", "sync",
    "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable",
})
# new namespaces the guest makes for a container; "network" is the VM's own (the pod's)
NAMESPACES = ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"]
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip


def features(oci_version: str, kabuto_version: str) -> dict[str, Any]:
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": oci_version,
        # hooks would run on the host, outside the VM: every kind is refused
        "hooks": [],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": CAPABILITIES,
            # the container's cgroup is the guest's cgroup v2; the host's cgroup managers are not used
            "cgroup": {"v1": False, "v2": True, "systemd": False, "systemdUser": False},
            # [runtime] disable_guest_seccomp: a profile is dropped or refused, never enforced
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {"io.kabuto.version": kabuto_version},
    }
