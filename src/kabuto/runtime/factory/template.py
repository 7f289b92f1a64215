"""Template mode (Kata's ``enable_template``): one VM booted to agent-ready with no sandbox device,
its RAM kept in a file and its device state saved; each new sandbox's VM is a clone of it that
maps the RAM file private (copy-on-write), so clones share the pages they only read.

Under ``template_path`` each template lives in ``<content key>/`` (``memory``, ``state``,
``template.json``): a template made from other inputs has another key and is never used. A new
template is built in a hidden directory and renamed into place; replacing or destroying one
unlinks its files, never truncates them: a running clone's private mapping of an unlinked file
keeps its pages, while a truncated file would kill it (SIGBUS) at its next read of a page it
had not copied yet. The files are read-only (0400) to everyone but root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kabuto.agent.client import wait_for_agent
from kabuto.agent.containers import ContainerCallError, ContainerClient
from kabuto.config.model import HypervisorConfig, KabutoConfig
from kabuto.errors import HypervisorError
from kabuto.hypervisor import Hypervisor, ResolvedConfig, new_hypervisor
from kabuto.runtime.factory.source import (
    DigestCache,
    FactoryError,
    WarmRequest,
    content_inputs,
    content_key,
    differences,
)
from kabuto.runtime.freshen import SEED_BYTES
from kabuto.ttrpc.status import Code

log = logging.getLogger(__name__)

MEMORY_FILE = "memory"
STATE_FILE = "state"
RECORD_FILE = "template.json"
DIGESTS_FILE = ".digests.json"
#: besides the guest RAM, what a template needs on its filesystem (device state, records)
STATE_ROOM_MIB = 32
DEFAULT_INIT_TIMEOUT = 120.0
READ_ONLY = 0o400
#: a container id no template has: the warm-up's ContainerService call answers NOT_FOUND once loaded
WARM_UP_PROBE = "kabuto-template-warm-up"


@dataclass(frozen=True)
class TemplateSettings:
    enabled: bool
    path: Path
    #: the key that enabled it, for messages
    source: str


def template_settings(config: KabutoConfig, name: str, table: HypervisorConfig) -> TemplateSettings:
    """runtime-rs's ``[hypervisor.<name>.factory]`` when it enables templating, else the Go
    runtime's top-level ``[factory]``."""
    if table.factory.enable_template:
        return TemplateSettings(True, Path(table.factory.template_path),
                                f"[hypervisor.{name}.factory] enable_template")
    return TemplateSettings(config.factory.enable_template, Path(config.factory.template_path),
                            "[factory] enable_template")


@dataclass(frozen=True)
class Template:
    directory: Path
    record: dict[str, Any]

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def memory(self) -> Path:
        return self.directory / MEMORY_FILE

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    def problem(self) -> str:
        """Why this template cannot be cloned ("" when it can): a file gone or cut short."""
        expected = int(self.record.get("memory_mib", 0)) * 2**20
        try:
            size = self.memory.stat().st_size
            state_size = self.state.stat().st_size
        except OSError as exc:
            return f"{exc.filename}: {exc.strerror}"
        if size != expected:
            return f"{self.memory} is {size} bytes, not the {expected} of the guest's RAM: it was cut short"
        if state_size == 0:
            return f"{self.state} is empty"
        return ""


def list_templates(root: Path) -> list[Template]:
    templates = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if directory.name.startswith(".") or not directory.is_dir():
            continue
        try:
            record = json.loads((directory / RECORD_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            templates.append(Template(directory, record))
    return templates


def _inputs(resolved: ResolvedConfig, root: Path) -> tuple[str, dict[str, Any]]:
    digests = DigestCache(root / DIGESTS_FILE)
    inputs = content_inputs(resolved.name, resolved.table, digests)
    digests.save()
    return content_key(inputs), inputs


def find_template(resolved: ResolvedConfig) -> tuple[Template | None, str]:
    """The template made from exactly this configuration's inputs, or None and why not."""
    settings = template_settings(resolved.config, resolved.name, resolved.table)
    key, inputs = _inputs(resolved, settings.path)
    for template in list_templates(settings.path):
        if template.key == key:
            return template, ""
    others = list_templates(settings.path)
    if not others:
        return None, f"no template under {settings.path} (`kabuto factory init` makes one)"
    newest = max(others, key=lambda t: t.record.get("created", 0))
    changed = ", ".join(differences(newest.record.get("inputs", {}), inputs)) or "unknown inputs"
    return None, (f"the template under {newest.directory} was made from other inputs (differing: "
                  f"{changed}); `kabuto factory init` makes one for these")


class TemplateSource:
    """Clones of the template whose content key matches the sandbox's configuration."""

    name = "template"

    async def take(self, request: WarmRequest) -> Hypervisor | None:
        resolved = request.resolved
        template, why = await asyncio.to_thread(find_template, resolved)
        if template is None:
            log.warning("sandbox %s: booting cold: %s", request.sandbox_id, why)
            return None
        if problem := await asyncio.to_thread(template.problem):
            log.warning("sandbox %s: booting cold: template %s is damaged: %s", request.sandbox_id,
                        template.directory, problem)
            return None
        hypervisor = new_hypervisor(resolved, jailer_root=request.jailer_root)
        if not hypervisor.capabilities.template:
            log.warning("sandbox %s: booting cold: %s cannot start VMs from a template", request.sandbox_id,
                        hypervisor.name)
            return None
        try:
            await hypervisor.prepare_vm(request.sandbox_id, netns=request.netns)
            for share in request.shares:
                await hypervisor.add_device(share)
            await hypervisor.start_from_template(template.memory, template.state,
                                                 dict(template.record.get("facts", {})), request.timeout)
        except HypervisorError as exc:
            await hypervisor.cleanup()
            log.warning("sandbox %s: booting cold: its clone of template %s failed: %s", request.sandbox_id,
                        template.directory, exc)
            return None
        except BaseException:
            await hypervisor.cleanup()
            raise
        log.info("sandbox %s: started from template %s", request.sandbox_id, template.directory)
        return hypervisor


async def init_template(resolved: ResolvedConfig, jailer_root: Path,
                        timeout: float = DEFAULT_INIT_TIMEOUT) -> Template:
    """`kabuto factory init`: boot a template VM for this configuration and save it (replacing
    the one made from the same inputs, whose running clones keep their pages)."""
    table = resolved.table
    settings = template_settings(resolved.config, resolved.name, table)
    if not settings.enabled:
        raise FactoryError(f"template mode is off: set [hypervisor.{resolved.name}.factory] enable_template "
                           "= true (or [factory] enable_template = true)")
    hypervisor = new_hypervisor(resolved, jailer_root=jailer_root)
    if not hypervisor.capabilities.template:
        raise FactoryError(f"{hypervisor.name} cannot make VM templates (its capabilities have no template)")
    await hypervisor.check()
    root = settings.path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FactoryError(f"template_path {root}: {exc.strerror}") from None
    _check_room(root, table.default_memory)
    key, inputs = await asyncio.to_thread(_inputs, resolved, root)
    token = secrets.token_hex(4)
    staging = root / f".{key}.{token}"
    staging.mkdir(mode=0o700)
    try:
        await hypervisor.prepare_vm(f"template-{token}")
        try:
            facts = await hypervisor.save_template(staging / MEMORY_FILE, staging / STATE_FILE, timeout,
                                                   warm_up=lambda: _warm_up(hypervisor, timeout))
        except HypervisorError as exc:
            raise FactoryError(f"the template VM failed: {exc}") from None
        record = {"key": key, "hypervisor": resolved.name, "memory_mib": table.default_memory,
                  "created": time.time(), "facts": facts, "inputs": inputs}
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
        for name in (MEMORY_FILE, STATE_FILE, RECORD_FILE):
            os.chmod(staging / name, READ_ONLY)
        staging.chmod(0o755)
        _replace(staging, root / key)
    except BaseException:
        await hypervisor.cleanup()
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise
    await hypervisor.cleanup()
    return Template(root / key, record)


async def _warm_up(hypervisor: Hypervisor, timeout: float) -> None:
    """Serve a connection and the calls every clone begins with (health, details, a reseed)
    before the template is saved, and wait for the agent's ContainerService, which loads in the
    background: its first-call work and that import are then done once, in the template, not
    again in each clone."""
    agent = await wait_for_agent(await hypervisor.get_agent_sockets(), timeout)
    async with agent:
        await agent.guest_details()
        await agent.reseed_random_dev(secrets.token_bytes(SEED_BYTES))
        while True:  # bounded by save_template's timeout
            try:
                await ContainerClient(agent).list_processes(WARM_UP_PROBE)
            except ContainerCallError as exc:
                if exc.code == Code.DEADLINE_EXCEEDED:
                    continue  # still loading
                if exc.code != Code.NOT_FOUND:
                    raise
            return


def _check_room(root: Path, memory_mib: int) -> None:
    """The guest RAM lands in the file as the template boots: a filesystem that fills up would
    kill the template VM (SIGBUS) half-way, so too little room is refused first."""
    st = os.statvfs(root)
    free_mib = st.f_bavail * st.f_frsize // 2**20
    needed = memory_mib + STATE_ROOM_MIB
    if free_mib < needed:
        raise FactoryError(f"template_path {root}: {free_mib} MiB free, a template needs {needed} MiB "
                           f"(default_memory {memory_mib} MiB of guest RAM, {STATE_ROOM_MIB} MiB of state)")


def _replace(staging: Path, target: Path) -> None:
    """Rename the new template into place; an old one is moved aside and unlinked (never
    truncated: clones mapping it keep running)."""
    old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def clones_of(template: Template) -> list[int]:
    """Processes mapping the template's RAM file (its clones' VMMs), from /proc/<pid>/maps."""
    needle = str(template.memory)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(entry / "maps") as maps:
                if any(line.rstrip("\n").endswith(needle) for line in maps):
                    pids.append(int(entry.name))
    return pids


def destroy_templates(root: Path) -> list[Template]:
    """`kabuto factory destroy`: remove every template under ``root`` (unlinked: running clones
    keep their pages and run on)."""
    removed = list_templates(root)
    for template in removed:
        shutil.rmtree(template.directory, ignore_errors=True)
    for leftover in root.glob(".*") if root.is_dir() else []:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return removed
