"""Test network namespaces (``ip netns add kbt-<random>``), always deleted, and ways into them."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 30.0

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc)")


def sh(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env)
    if done.returncode:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


def jq(*args: str) -> Any:
    out = sh(*args)
    return json.loads(out) if out.strip() else []


@contextlib.contextmanager
def netns(prefix: str = "kbt") -> Iterator[str]:
    """A fresh named netns (lo up); its name. Deleted on the way out, whatever happened."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT)


def path(name: str) -> str:
    return f"/run/netns/{name}"


def in_netns(name: str, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """``fn()`` run by a thread that entered the netns first (sockets and tun fds it opens stay
    in that netns, usable from any thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(path(name), os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns")
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"in netns {name}: still running after {timeout} s")
    if "error" in result:
        raise result["error"]
    return result["value"]
