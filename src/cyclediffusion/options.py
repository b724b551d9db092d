"""Options declared once: a dataclass field with its default and help is the CLI flag, the config-file key and the
saved run option at the same time.

A field made with :func:`option` carries its help text, extra spellings (the seeds' ``--learning_rate``) and a
parser for the command line in its metadata. :func:`add_flags` turns the fields of a dataclass into argparse flags
(``--batch-size`` and ``--batch_size`` alike, the default in the help), :func:`resolve` merges the defaults, a
config file and the flags actually given, in that order, and checks every value against its field's type, and
:func:`to_plain` gives the plain dict that ``options.yaml`` holds. Nested dataclass fields (``ModelOptions.cycle``)
become flags with a prefix (``--cycle-weight``) and a nested mapping in the file.

This module imports neither Lightning nor torch: the CLI builds its parser from it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MISSING = dataclasses.MISSING


class OptionError(ValueError):
    """An option file or value that does not fit its field: unknown key, wrong type."""


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    aliases: tuple[str, ...] = (),
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    prefix: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with the metadata its flag is built from.

    Args:
        default: the default (omit for a required option); ``factory`` for mutable defaults.
        help: one line for ``--help``; the default is appended to it.
        aliases: more flag names (without dashes), e.g. the seeds' ``learning_rate``.
        flag: the flag's own name when it differs from the field's (``sample_prompt`` for ``sample_prompts``).
        parse: turns the command-line text into the value (default: the field's type).
        choices: the allowed values.
        prefix: for a nested dataclass field, the prefix of its flags (``cycle`` -> ``--cycle-weight``).
        cli: False keeps the field out of the command line (it still lives in config files).
    """
    metadata = {"help": help, "aliases": aliases, "flag": flag, "parse": parse, "choices": choices, "prefix": prefix}
    metadata["cli"] = cli
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def spellings(name: str) -> list[str]:
    """``--some-flag`` and ``--some_flag`` for a name written either way."""
    dashed, underscored = name.replace("_", "-"), name.replace("-", "_")
    return [f"--{dashed}"] + ([f"--{underscored}"] if underscored != dashed else [])


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _non_none(tp: Any) -> list[Any]:
    return [a for a in _args(tp) if a is not type(None)] if _is_union(tp) else [tp]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any) -> str:
    """A type as a user reads it: ``integer``, ``number or null`` ..."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if _is_union(tp):
        return " or ".join("null" if a is type(None) else describe(a) for a in _args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return f"a list of {describe(_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if _is_dataclass_type(tp):
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def check_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from a config file) as a value of type ``tp``, or an :class:`OptionError` naming ``where``."""
    if _is_union(tp):
        if value is None and type(None) in _args(tp):
            return None
        for member in _non_none(tp):
            try:
                return check_value(value, member, where)
            except OptionError:
                continue
        raise OptionError(f"{where} must be {describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise OptionError(f"{where} must be {describe(tp)}, got {value!r}")
        items = [check_value(v, _args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise OptionError(f"{where} must be a mapping of {tp.__name__} options, got {value!r}")
        return from_mapping(tp, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        raise OptionError(f"{where} must be {describe(tp)}, got {value!r}")
    return float(value) if tp is float else value


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build ``cls`` from a mapping (a config file's section): unknown keys and wrong types are errors."""
    values = checked_values(cls, data, where)
    return cls(**values)


def checked_values(cls: type, data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The mapping's values, each checked against its field of ``cls`` (nested dataclasses built)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = field_types(cls)
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        place = f"{where}." if where else ""
        raise OptionError(f"unknown option {place}{unknown[0]} (known: {', '.join(fields)})")
    return {k: check_value(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested values) as plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------- command line
def add_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    title: str | None = None,
    prefix: str = "",
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per field of ``cls`` (both spellings and its aliases); values land at ``dest`` = the field's
    dotted path (``cycle.weight``) only when given, so that :func:`resolve` can tell given from default.
    ``defaults`` are a command's own defaults for some fields (shown in the help)."""
    group = parser.add_argument_group(title) if title else parser
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        tp = types_[f.name]
        if _is_dataclass_type(tp):
            add_flags(parser, tp, f"{title or cls.__name__}: {meta.get('help', '')}".strip(": "), meta["prefix"])
            continue
        name = meta.get("flag") or f.name
        names = [*spellings(f"{prefix}_{name}" if prefix else name)]
        for alias in meta.get("aliases", ()):
            names += [s for s in spellings(alias) if s not in names]
        dest = f"{prefix}.{f.name}" if prefix else f.name
        default = (defaults or {}).get(f.name, default_of(f))
        shown = "required" if default is MISSING else f"default: {_show(default)}"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        kwargs["help"] = f"{meta.get('help', '')} ({shown})".replace("%", "%%")  # argparse formats help with %
        members = _non_none(tp)
        base = members[0] if len(members) == 1 else None
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs.update(action="append", type=meta.get("parse") or _args(base)[0])
        elif typing.get_origin(base) is tuple:
            kwargs.update(nargs="+", type=meta.get("parse") or _args(base)[0])
        else:
            kwargs["type"] = meta.get("parse") or base or str
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        group.add_argument(*names, **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return "none" if value is None else str(value)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as a nested mapping (``cycle.weight`` -> ``{"cycle": {"weight"}}``)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        parts = dest.split(".")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping of sections (``data``, ``run``, ``model`` ...)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise OptionError(f"{path} is not valid YAML or JSON: {str(err).splitlines()[0]}") from err
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise OptionError(f"{path} must hold a mapping of option sections, got {type(data).__name__}")
    return dict(data)


def resolve(
    sections: Mapping[str, type],
    config: Mapping[str, Any],
    flags: Mapping[str, Any],
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One instance per section (``{"run": RunOptions, ...}``) from the fields' defaults, the command's own
    ``defaults``, the config file's values and the flags given (last wins). Flags are keyed by field name across
    sections, as the CLI stores them."""
    unknown = sorted(set(config) - set(sections))
    if unknown:
        raise OptionError(f"unknown section {unknown[0]!r} in the config (known: {', '.join(sections)})")
    out = {}
    for section, cls in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}
        given = config.get(section) or {}
        if not isinstance(given, Mapping):
            raise OptionError(f"section {section!r} must be a mapping")
        values = merge(merge((defaults or {}).get(section, {}), given), {k: v for k, v in flags.items() if k in names})
        missing = [f.name for f in dataclasses.fields(cls) if default_of(f) is MISSING and f.name not in values]
        if missing:
            raise OptionError(f"--{missing[0].replace('_', '-')} is required (on the command line or in --config)")
        out[section] = from_mapping(cls, values, section)  # nested sections keep the defaults they are not given
    return out
