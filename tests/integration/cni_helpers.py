"""CNI as a CRI drives it, for the integration tests (no tests here): Debian's plugins run with
CNI_COMMAND and the network config on stdin, from a netns standing for the host so the machine's
own network is never touched; every netns the tests make is named here and removed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CNI_PATH = Path("/usr/lib/cni")
TIMEOUT = 60.0
#: the prefix of every netns these tests make (the leftover check looks for it)
NETNS_PREFIX = "kb"


def sh(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
       timeout: float = TIMEOUT) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}: {done.stderr or done.stdout}"
    return done.stdout


def require_cni_and_runc() -> None:
    for binary, package in ((CNI_PATH / "bridge", "containernetworking-plugins"),
                            (shutil.which("runc"), "runc")):
        if not binary or not Path(binary).exists():
            pytest.fail(f"{package} is not installed (make deps installs it)")


def host_netns_fixture() -> Iterator[str]:
    require_cni_and_runc()
    name = f"{NETNS_PREFIX}h-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=TIMEOUT)


def bridge_config(subnet: str, state: Path, *, bridge: str = "kbt-br0", mtu: int | None = None,
                  default_route: bool = True) -> dict[str, Any]:
    """A bridge + host-local network as a CRI's CNI config file would hold it."""
    ipam: dict[str, Any] = {"type": "host-local", "subnet": subnet, "dataDir": str(state)}
    if default_route:
        ipam["routes"] = [{"dst": "0.0.0.0/0"}]
    config: dict[str, Any] = {"cniVersion": "1.0.0", "name": f"kabuto-{bridge}", "type": "bridge",
                              "bridge": bridge, "isGateway": True, "ipMasq": False, "ipam": ipam}
    if mtu is not None:
        config["mtu"] = mtu
    return config


class CniPod:
    """A pod netns made by CNI's plugins (run in ``host``): loopback, then ``config`` as eth0;
    ``add`` attaches further networks; DEL of each and removal on close."""

    def __init__(self, host: str, config: dict[str, Any]) -> None:
        self.host = host
        self.name = f"{NETNS_PREFIX}p-{secrets.token_hex(4)}"
        self.networks: list[tuple[dict[str, Any], str]] = []
        sh("ip", "netns", "add", self.name)
        try:
            # as containerd's CRI: the loopback plugin for lo, then the pod network's plugin for eth0
            self._cni("ADD", {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}, "lo")
            self.result = self.add(config, "eth0")
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def address(self, result: dict[str, Any] | None = None) -> str:
        """The first address CNI gave (without its prefix length)."""
        return (result or self.result)["ips"][0]["address"].split("/")[0]

    def add(self, config: dict[str, Any], ifname: str) -> dict[str, Any]:
        result = json.loads(self._cni("ADD", config, ifname))
        self.networks.append((config, ifname))
        return result

    def remove(self, ifname: str) -> None:
        """CNI DEL of the network attached as ``ifname`` (its veth goes)."""
        [(config, _)] = [(c, i) for c, i in self.networks if i == ifname]
        self._cni("DEL", config, ifname)
        self.networks.remove((config, ifname))

    def _cni(self, command: str, config: dict[str, Any], ifname: str) -> str:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.name, "CNI_NETNS": self.path,
               "CNI_IFNAME": ifname, "CNI_PATH": str(CNI_PATH),
               "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        return sh("ip", "netns", "exec", self.host, str(CNI_PATH / config["type"]), stdin=json.dumps(config),
                  env=env)

    def close(self) -> None:
        try:
            for config, ifname in reversed(self.networks):
                self._cni("DEL", config, ifname)
            self.networks = []
        finally:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=TIMEOUT)


def links(netns: str) -> list[str]:
    return sorted(link["ifname"] for link in json.loads(sh("ip", "-n", netns, "-j", "link")))


def ingress_leftovers(netns: str) -> list[str]:
    """Ingress/clsact qdiscs and tc filters anywhere in ``netns`` (CNI's bridge plugin makes none)."""
    found = []
    for link in links(netns):
        qdiscs = json.loads(sh("ip", "netns", "exec", netns, "tc", "-j", "qdisc", "show", "dev", link)
                            or "[]")
        found += [f"{link}: qdisc {q['kind']}" for q in qdiscs if q.get("kind") in ("ingress", "clsact")]
        filters = json.loads(sh("ip", "netns", "exec", netns, "tc", "-j", "filter", "show", "dev", link,
                                "ingress") or "[]")
        found += [f"{link}: filter {f.get('kind')}" for f in filters if f.get("kind")]
    return found


def netns_left(names: list[str]) -> list[str]:
    """Which of ``names`` still exist as named network namespaces."""
    listed = sh("ip", "netns", "list")
    return [name for name in names if any(line.split()[0] == name for line in listed.splitlines() if line)]
