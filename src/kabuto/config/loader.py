"""Find, read, merge, check and adjust the configuration (the path Kata runtime-rs takes).

File search: the ``path`` argument, else ``$KABUTO_CONFIG``, else /etc/kabuto/configuration.toml,
else the built-in default shipped in this package. Drop-ins from ``config.d/*.toml`` beside
the file are deep-merged in name order. Then: strict types, unknown keys as warnings,
annotations, and the active hypervisor plugin's ``adjust`` and ``validate``.
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

from kabuto.config.annotations import apply_annotations, check_enable_annotations
from kabuto.config.model import AgentConfig, HypervisorConfig, KabutoConfig
from kabuto.errors import AnnotationError, ConfigError, Problem

ENV_VAR = "KABUTO_CONFIG"
SYSTEM_PATH = Path("/etc/kabuto/configuration.toml")
DROPIN_DIR = "config.d"
BUILTIN_NAME = "default.toml"
#: a configuration file is operator input, but still bounded (Kata's largest is ~40 KiB)
MAX_FILE_BYTES = 1 << 20

INTERNETWORKING_MODELS = ("macvtap", "none", "tcfilter", "l3forwarding")
VFIO_MODES = ("", "vfio", "guest-kernel")
EMPTYDIR_MODES = ("shared-fs", "block-encrypted", "block-plain")
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "critical")


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
    validate: bool = True,
) -> KabutoConfig:
    """Return the adjusted, validated configuration; raise ConfigError listing every problem.

    ``annotations`` are the OCI spec's (untrusted; see kabuto.config.annotations) and
    ``hypervisor_name`` overrides ``[runtime] hypervisor_name`` (the CLI's --hypervisor).
    ``validate=False`` skips only the final value checks (for showing a configuration that
    cannot run yet); unreadable files, wrong types and refused annotations still raise.
    """
    from kabuto.hypervisor.registry import canonical_name, get_plugin, load_warnings, registered_names

    file = config_path(path)
    warnings: list[str] = list(load_warnings())
    if file is None:
        source = f"<built-in {BUILTIN_NAME}>"
        data = _normalise_aliases(_parse(builtin_default_text(), source), source, canonical_name)
        dropins: list[Path] = []
    else:
        source = str(file)
        data = _normalise_aliases(_parse(_read(file), source), source, canonical_name)
        dropins = _dropin_files(file.parent / DROPIN_DIR, warnings)
        for dropin in dropins:
            overlay = _normalise_aliases(_parse(_read(dropin), str(dropin)), str(dropin), canonical_name)
            data = deep_merge(data, overlay)

    config, dropped = _build(data, source)
    config.source = source
    config.dropins = [str(d) for d in dropins]
    warnings += [f"unknown key {key} (ignored)" for key in dropped]
    warnings += [f"unknown key {key} (kept, not used)" for key in _unknown_keys(config)]
    file_tables = set(config.hypervisor)
    for name in sorted(file_tables - set(registered_names())):
        warnings.append(f"[hypervisor.{name}]: no plugin registered under that name (kept, not used)")

    name = canonical_name(hypervisor_name or config.runtime.hypervisor_name)
    get_plugin(name)  # unknown name: ConfigError listing the registered ones
    config.runtime.hypervisor_name = name
    config.hypervisor.setdefault(name, HypervisorConfig())
    config.warnings = warnings

    regex_problems = _prefixed(f"hypervisor.{name}", check_enable_annotations(config.hypervisor[name]))
    if regex_problems:
        raise ConfigError(f"invalid configuration {source}", regex_problems)
    from_annotations = apply_annotations(config, annotations or {}, file_tables)
    name = config.runtime.hypervisor_name  # an annotation may have switched it
    plugin = get_plugin(name)
    table = config.hypervisor[name]
    plugin.adjust(table)
    if validate:
        # the regexes of a table an annotation switched to were not checked above
        own = check_enable_annotations(table) + plugin.validate(table)
        problems = _prefixed(f"hypervisor.{name}", own) + _common_problems(config)
        _raise_if_any(problems, from_annotations, source)
    return config


def _raise_if_any(problems: list[Problem], from_annotations: dict[str, str], source: str) -> None:
    if not problems:
        return
    marked = [
        Problem(p.key, p.value, f"{p.reason} (set by annotation {from_annotations[_base_key(p.key)]})")
        if _base_key(p.key) in from_annotations else p
        for p in problems
    ]
    if marked != problems:
        raise AnnotationError(f"annotations make the configuration {source} invalid", marked)
    raise ConfigError(f"invalid configuration {source}", problems)


def _base_key(key: str) -> str:
    return re.sub(r"\[\d+\]$", "", key)


def _prefixed(prefix: str, problems: list[Problem]) -> list[Problem]:
    return [Problem(f"{prefix}.{p.key}", p.value, p.reason) for p in problems]


def _common_problems(config: KabutoConfig) -> list[Problem]:
    """Kata's [runtime] and [agent] rules (the hypervisor's belong to its plugin)."""
    problems: list[Problem] = []
    runtime = config.runtime
    if not runtime.name:
        problems.append(Problem("runtime.name", runtime.name, "must not be empty"))
    for key, allowed in (("internetworking_model", INTERNETWORKING_MODELS), ("vfio_mode", VFIO_MODES),
                         ("emptydir_mode", EMPTYDIR_MODES), ("log_level", LOG_LEVELS)):
        value = getattr(runtime, key)
        if value not in allowed:
            choices = ", ".join(map(repr, allowed))
            problems.append(Problem(f"runtime.{key}", value, f"must be one of {choices}"))
    if runtime.create_container_timeout <= 0:
        problems.append(Problem("runtime.create_container_timeout", runtime.create_container_timeout,
                                "must be a positive number of seconds"))
    if config.agent and runtime.agent_name not in config.agent:
        have = ", ".join(sorted(config.agent))
        problems.append(Problem("runtime.agent_name", runtime.agent_name,
                                f"no [agent.{runtime.agent_name}] table (have: {have})"))
    for name, agent in config.agent.items():
        problems += _agent_problems(f"agent.{name}", agent)
    return problems


def _agent_problems(prefix: str, agent: AgentConfig) -> list[Problem]:
    problems: list[Problem] = []
    if agent.dial_timeout_ms <= 0:
        problems.append(Problem(f"{prefix}.dial_timeout_ms", agent.dial_timeout_ms, "must be positive"))
    elif agent.reconnect_timeout_ms < agent.dial_timeout_ms:
        problems.append(Problem(f"{prefix}.reconnect_timeout_ms", agent.reconnect_timeout_ms,
                                f"below dial_timeout_ms ({agent.dial_timeout_ms})"))
    if agent.log_level not in LOG_LEVELS:
        problems.append(Problem(f"{prefix}.log_level", agent.log_level,
                                f"must be one of {', '.join(LOG_LEVELS)}"))
    for key in ("container_pipe_size", "server_port", "log_port", "passfd_listener_port", "dial_timeout",
                "request_timeout_ms", "create_container_timeout", "health_check_request_timeout_ms",
                "cdh_api_timeout_ms", "launch_process_timeout"):
        if getattr(agent, key) < 0:
            problems.append(Problem(f"{prefix}.{key}", getattr(agent, key), "must not be negative"))
    return problems


# -- reading -------------------------------------------------------------------------------

def _read(file: Path) -> str:
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"configuration file {file} is larger than {MAX_FILE_BYTES} bytes")
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


def _normalise_aliases(data: dict[str, Any], source: str, canonical: Any) -> dict[str, Any]:
    """``[hypervisor.clh]`` becomes ``[hypervisor.cloud-hypervisor]`` before files are merged."""
    tables = data.get("hypervisor")
    if not isinstance(tables, dict):
        return data
    renamed: dict[str, Any] = {}
    for name, table in tables.items():
        target = canonical(name)
        if target in renamed:
            raise ConfigError(f"{source}: [hypervisor.{name}] and another table both name {target!r}; "
                              "keep one")
        renamed[target] = table
    return {**data, "hypervisor": renamed}


# -- checking ------------------------------------------------------------------------------

#: KabutoConfig fields that record where the configuration came from, not TOML keys
_BOOKKEEPING = ("source", "dropins", "warnings")


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


def hypervisor_table(config: KabutoConfig | None, name: str) -> HypervisorConfig:
    """A copy of ``[hypervisor.<name>]`` adjusted by its plugin, or the plugin's defaults.

    For showing every plugin's availability (``kabuto hypervisors``) without validating.
    """
    from kabuto.hypervisor.registry import canonical_name, get_plugin

    name = canonical_name(name)
    present = config.hypervisor.get(name) if config is not None else None
    table = present.model_copy(deep=True) if present is not None else HypervisorConfig()
    if present is None or config is None or name != config.runtime.hypervisor_name:
        get_plugin(name).adjust(table)
    return table
