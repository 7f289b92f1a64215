"""Debian packages for the guest, fetched with apt-get download and unpacked with dpkg-deb -x.

Nothing here installs anything on the host: packages are resolved against the host's apt
lists, downloaded into Kabuto's own cache and extracted into a build directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kabuto.errors import ImageError

APT_QUERY_TIMEOUT = 60.0
APT_UPDATE_TIMEOUT = 600.0
APT_DOWNLOAD_TIMEOUT = 900.0
EXTRACT_TIMEOUT = 300.0
_OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"

    def deb_name(self) -> str:
        """The file name apt-get download gives it (an epoch's colon is written %3a)."""
        return f"{self.deb_prefix()}amd64.deb"

    def deb_prefix(self) -> str:
        """The file name up to its architecture, which is ``all`` for linux-source."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_"

    def find_deb(self, deb_dir: Path) -> Path | None:
        found = sorted(deb_dir.glob(f"{self.deb_prefix()}*.deb"))
        return found[0] if found else None


async def run(args: list[str], timeout: float, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> str:
    """Run a command to completion within ``timeout``; its stdout, or ImageError with its output."""
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ImageError(f"{' '.join(args[:3])} ... did not finish within {timeout:.0f} s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace")[-_OUTPUT_TAIL:].strip()
        raise ImageError(f"{' '.join(args)} failed (exit {proc.returncode}): {detail}")
    return out.decode(errors="replace")


_CANDIDATE = re.compile(r"^(\S+):\n(?:\s.*\n)*?\s+Candidate: (\S+)", re.MULTILINE)


async def candidate_versions(names: list[str]) -> dict[str, str]:
    """The version apt would pick for each name (None-free: unknown names are left out)."""
    out = await run(["apt-cache", "policy", *names], APT_QUERY_TIMEOUT, env=_apt_env())
    return {name: version for name, version in _CANDIDATE.findall(out) if version != "(none)"}


async def resolve(names: list[str], update_if_missing: bool = True) -> list[Package]:
    """Pin each package name to its candidate version, running apt-get update once if needed."""
    versions = await candidate_versions(names)
    missing = [n for n in names if n not in versions]
    if missing and update_if_missing:
        await run(["apt-get", "update", "-qq"], APT_UPDATE_TIMEOUT, env=_apt_env())
        versions = await candidate_versions(names)
        missing = [n for n in names if n not in versions]
    if missing:
        raise ImageError(f"no installable version of {', '.join(missing)} in the apt lists "
                         "(check /etc/apt/sources.list and run apt-get update)")
    return [Package(n, versions[n]) for n in names]


async def dependency_of(package: Package, prefix: str) -> str:
    """The name of ``package``'s first Depends entry that starts with ``prefix``.

    Debian's kernel metapackages (linux-image-amd64) depend on the versioned image package
    (linux-image-6.1.0-NN-amd64) that holds the kernel.
    """
    out = await run(["apt-cache", "show", package.spec], APT_QUERY_TIMEOUT, env=_apt_env())
    for line in out.splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            for item in line.split(":", 1)[1].split(","):
                name = item.strip().split(" ")[0]
                if name.startswith(prefix):
                    return name
    raise ImageError(f"{package.spec} has no dependency starting with {prefix!r}")


async def download(packages: list[Package], deb_dir: Path) -> list[Path]:
    """The .deb of each package in ``deb_dir``, downloading only those not there yet."""
    os.makedirs(deb_dir, exist_ok=True)
    missing = [p.spec for p in packages if p.find_deb(deb_dir) is None]
    if missing:
        # A private partial dir: a download that dies half-way never shows up as a .deb.
        partial = deb_dir / f".partial-{os.getpid()}"
        partial.mkdir(exist_ok=True)
        try:
            await run(["apt-get", "download", "-q", *missing], APT_DOWNLOAD_TIMEOUT, cwd=partial,
                      env=_apt_env())
            for deb in partial.glob("*.deb"):
                deb.replace(deb_dir / deb.name)
        finally:
            for leftover in partial.iterdir():
                leftover.unlink()
            partial.rmdir()
    found = {p: p.find_deb(deb_dir) for p in packages}
    absent = [p.spec for p, path in found.items() if path is None]
    if absent:
        raise ImageError(f"apt-get download did not produce {', '.join(absent)} in {deb_dir}")
    return [path for path in found.values() if path is not None]


async def extract(deb: Path, dest: Path) -> None:
    os.makedirs(dest, exist_ok=True)
    await run(["dpkg-deb", "-x", str(deb), str(dest)], EXTRACT_TIMEOUT)


def _apt_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
