"""Find, read, merge and type the configuration, then apply the annotations.

File search: the ``path`` argument, else ``$KABUTO_CONFIG``, else /etc/kabuto/configuration.toml,
else the built-in default shipped in this package. Drop-ins from ``config.d/*.toml`` beside
the file are deep-merged in name order. Then: strict types, unknown keys as warnings,
annotations, a warning for each set key Kabuto does not apply (kabuto.config.keys), and
the agent timeouts made consistent. The active hypervisor plugin's ``adjust`` and ``validate``
come after, in kabuto.hypervisor.resolve: this package is data and rules on data.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kabuto.bounded import FileTooLarge, read_bounded
from kabuto.config.annotations import apply_annotations, check_enable_annotations
from kabuto.config.keys import unapplied_warnings
from kabuto.config.model import HypervisorConfig, KabutoConfig
from kabuto.config.rules import (
    HypervisorNames,
    prefixed,
    reconcile_agent_timeouts,
    reconcile_create_container_timeout,
)
from kabuto.errors import ConfigError, Problem

ENV_VAR = "KABUTO_CONFIG"
SYSTEM_PATH = Path("/etc/kabuto/configuration.toml")
DROPIN_DIR = "config.d"
BUILTIN_NAME = "default.toml"
#: a configuration file is operator input, but still bounded (Kata's largest is ~40 KiB)
MAX_FILE_BYTES = 1 << 20



def config_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The file ``load_config`` reads, or None for the built-in default.

    An explicit ``path`` or ``$KABUTO_CONFIG`` must exist; the system path is optional.
    """
    for chosen, origin in ((path, "--config"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if chosen is not None and str(chosen) != "":
            candidate = Path(chosen)
            if not candidate.is_file():
                raise ConfigError(f"configuration file {candidate} (from {origin}) does not exist "
                                  "or is not a regular file")
            return candidate
    return SYSTEM_PATH if SYSTEM_PATH.is_file() else None


def builtin_default_text() -> str:
    return files("kabuto.config").joinpath(BUILTIN_NAME).read_text(encoding="utf-8")


def load_config(
    path: str | os.PathLike[str] | None = None,
    annotations: Mapping[str, str] | None = None,
    hypervisor_name: str | None = None,
    *,
    names: HypervisorNames | None = None,
) -> KabutoConfig:
    """Read, merge and type the configuration and apply the annotations; raise ConfigError.

    ``annotations`` are the OCI spec's (untrusted; see kabuto.config.annotations) and
    ``hypervisor_name`` overrides ``[runtime] hypervisor_name`` (the CLI's --hypervisor).
    ``names`` are the registered hypervisors: aliases are resolved and an unknown name is
    refused; without it every name is taken as written. The tables are data here: the
    hypervisor registry's ``resolve`` has the plugin adjust and validate them.
    """
    names = names if names is not None else HypervisorNames()
    file = config_path(path)
    warnings: list[str] = []
    if file is None:
        source = f"<built-in {BUILTIN_NAME}>"
        data = _normalise_aliases(_parse(builtin_default_text(), source), source, names)
        dropins: list[Path] = []
    else:
        source = str(file)
        data = _normalise_aliases(_parse(_read(file), source), source, names)
        dropins = _dropin_files(file.parent / DROPIN_DIR, warnings)
        for dropin in dropins:
            overlay = _normalise_aliases(_parse(_read(dropin), str(dropin)), str(dropin), names)
            data = deep_merge(data, overlay)

    config, dropped = _build(data, source)
    config.source = source
    config.dropins = [str(d) for d in dropins]
    warnings += [f"unknown key {key} (ignored)" for key in dropped]
    warnings += [f"unknown key {key} (kept, not used)" for key in _unknown_keys(config)]
    file_tables = set(config.hypervisor)
    if names.registered:
        for name in sorted(file_tables - names.registered):
            warnings.append(f"[hypervisor.{name}]: no plugin registered under that name (kept, not used)")
        name = names.require(hypervisor_name or config.runtime.hypervisor_name)
    else:
        name = hypervisor_name or config.runtime.hypervisor_name
    config.runtime.hypervisor_name = name
    config.hypervisor.setdefault(name, HypervisorConfig())
    config.warnings = warnings

    regex_problems = prefixed(f"hypervisor.{name}", check_enable_annotations(config.hypervisor[name]))
    if regex_problems:
        raise ConfigError(f"invalid configuration {source}", regex_problems)
    config.annotated = apply_annotations(config, annotations or {}, file_tables, names)
    # what the files and annotations asked for, before reconciling changes any value
    config.warnings += unapplied_warnings(config)
    config.warnings += reconcile_agent_timeouts(config)
    reconcile_create_container_timeout(config)
    return config


# -- reading -------------------------------------------------------------------------------

def _read(file: Path) -> str:
    try:
        raw = read_bounded(file, MAX_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror or exc}") from None
    except FileTooLarge as exc:
        raise ConfigError(f"configuration file {file} is {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{file}: line {line}, column {column}: not valid UTF-8") from None


_POSITION = re.compile(r"^(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$", re.S)


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _POSITION.match(message)
        if match:
            where = f"line {match['line']}, column {match['column']}"
            message = match["message"]
        else:  # "(at end of document)"
            lines = text.split("\n")
            where = f"line {len(lines)}, column {len(lines[-1]) + 1}"
            message = message.replace(" (at end of document)", "")
        raise ConfigError(f"malformed TOML in {source}: {where}: {message}") from None
    except RecursionError:
        raise ConfigError(f"malformed TOML in {source}: nested too deeply") from None


def _dropin_files(directory: Path, warnings: list[str]) -> list[Path]:
    if not directory.is_dir():
        return []
    chosen = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.suffix != ".toml":
            continue
        if not entry.is_file():
            warnings.append(f"drop-in {entry} is not a regular file (skipped)")
            continue
        chosen.append(entry)
    return chosen


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key, recursively; anything else (arrays too) is replaced, as in Kata."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _normalise_aliases(data: dict[str, Any], source: str, names: HypervisorNames) -> dict[str, Any]:
    """``[hypervisor.clh]`` becomes ``[hypervisor.cloud-hypervisor]`` before files are merged."""
    tables = data.get("hypervisor")
    if not isinstance(tables, dict):
        return data
    renamed: dict[str, Any] = {}
    for name, table in tables.items():
        target = names.canonical(name)
        if target in renamed:
            raise ConfigError(f"{source}: [hypervisor.{name}] and another table both name {target!r}; "
                              "keep one")
        renamed[target] = table
    return {**data, "hypervisor": renamed}


# -- checking ------------------------------------------------------------------------------

#: KabutoConfig fields that record where the configuration came from, not TOML keys
_BOOKKEEPING = ("source", "dropins", "warnings", "annotated")


def _build(data: dict[str, Any], source: str) -> tuple[KabutoConfig, list[str]]:
    """The typed configuration and the bookkeeping keys the file wrongly set (dropped)."""
    dropped = [key for key in _BOOKKEEPING if key in data]
    data = {key: value for key, value in data.items() if key not in _BOOKKEEPING}
    problems = [Problem(key, "<string>", "contains a NUL character") for key in _nul_strings(data, "")]
    if problems:
        raise ConfigError(f"invalid configuration {source}", problems)
    try:
        return KabutoConfig.model_validate(data, strict=True), dropped
    except ValidationError as exc:
        problems = [Problem(_key_path(err["loc"]), err.get("input"), err["msg"]) for err in exc.errors()]
        raise ConfigError(f"invalid configuration {source}", problems) from None
    except RecursionError:
        raise ConfigError(f"invalid configuration {source}: nested too deeply") from None


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _nul_strings(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, str):
        if "\0" in value:
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if "\0" in key:
                yield child
            yield from _nul_strings(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nul_strings(item, f"{path}[{index}]")


def _unknown_keys(model: BaseModel, path: str = "") -> Iterator[str]:
    for key in sorted(model.model_extra or {}):
        yield f"{path}.{key}" if path else key
    for key in type(model).model_fields:
        child = f"{path}.{key}" if path else key
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            yield from _unknown_keys(value, child)
        elif isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _unknown_keys(item, f"{child}.{name}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _unknown_keys(item, f"{child}[{index}]")
