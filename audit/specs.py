"""Parsing of the spec strings the CLI and the gate config accept.

Specs are small strings (``builtin:lenet``, ``model.py:build``, ``noise:sigma=0.5``) so that one grammar
serves the command line, ``splitaudit.toml`` and ``results.json``. Parsing is kept apart from
resolving (importing, loading) so the grammar can be tested on its own.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitaudit.errors import SpecError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ModelSpec:
    """``builtin:NAME``, ``path/to/file.py:callable``, ``package.module:callable`` or ``hf:DIR``."""

    kind: str  # "builtin" | "file" | "module" | "hf"
    target: str  # builtin name, file path or module path
    attr: str | None  # callable name (None for builtins)
    raw: str


def parse_model_spec(spec: str) -> ModelSpec:
    spec = spec.strip()
    forms = "builtin:NAME, path/to/file.py:CALLABLE or package.module:CALLABLE"
    if ":" not in spec:
        raise SpecError(f"model spec {spec!r} has no ':CALLABLE' part; expected {forms}")
    if spec.startswith("hf:"):  # a local Hugging Face model directory (the text extra)
        if not spec[3:]:
            raise SpecError(f"model spec {spec!r}: the directory is empty; expected hf:path/to/model_dir")
        return ModelSpec("hf", spec[3:], None, spec)
    head, attr = spec.rsplit(":", 1)
    if head == "builtin":
        if not attr:
            raise SpecError(f"model spec {spec!r}: builtin name is empty; expected {forms}")
        return ModelSpec("builtin", attr, None, spec)
    if not head or not attr:
        raise SpecError(f"model spec {spec!r} is incomplete; expected {forms}")
    if not _IDENT.match(attr):
        raise SpecError(f"model spec {spec!r}: {attr!r} is not a valid Python name")
    if head.endswith(".py") or "/" in head or "\\" in head:
        return ModelSpec("file", head, attr, spec)
    if all(_IDENT.match(part) for part in head.split(".")):
        return ModelSpec("module", head, attr, spec)
    raise SpecError(f"model spec {spec!r}: {head!r} is neither a .py file nor a module path; expected {forms}")


@dataclass(frozen=True)
class PluginSpec:
    """``NAME[:key=value[,key=value]]`` for defenses (and attacks with options)."""

    name: str
    params: dict[str, str]
    raw: str


def parse_plugin_spec(spec: str, *, what: str = "defense") -> PluginSpec:
    raw = spec
    spec = spec.strip()
    if not spec:
        raise SpecError(f"empty {what} spec")
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if not _IDENT.match(name):
        raise SpecError(f"{what} spec {raw!r}: {name!r} is not a valid name (expected NAME[:key=value,...])")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise SpecError(f"{what} spec {raw!r}: {item!r} is not key=value")
            if key in params:
                raise SpecError(f"{what} spec {raw!r}: key {key!r} given twice")
            params[key] = value
    elif ":" in spec:
        raise SpecError(f"{what} spec {raw!r} has ':' but no parameters")
    return PluginSpec(name, params, raw)


def format_value(value: object) -> str:
    """Canonical text of a config value: ``0.5`` not ``0.50``, ``8`` not ``8.0``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def canonical_spec(name: str, params: dict[str, object]) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in params.items())


def param(default, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, help=""):
    """A validated config field: ``sigma: float = param(1.0, lo=0)``.

    The bounds travel in the field's metadata so that the error message can name the allowed range.
    """
    from dataclasses import field

    return field(
        default=default,
        metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "help": help},
    )


def _range_text(meta) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    lo, hi = meta.get("lo"), meta.get("hi")
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else format_value(lo)}, {'inf' if hi is None else format_value(hi)}{right}"


def build_config(cls, params: dict[str, object], *, what: str):
    """Build the frozen config dataclass ``cls`` from string (or typed) params, checking keys and ranges."""
    from dataclasses import fields

    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise SpecError(f"{what}: unknown key {unknown[0]!r} (allowed keys: {allowed})")
    values = {}
    for name, value in params.items():
        f = known[name]
        kind = type(f.default)
        meta = f.metadata
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            elif kind is int and isinstance(value, str):
                value = int(value)
            elif kind is float:
                value = float(value)
        except ValueError:
            raise SpecError(f"{what}: {name}={value!r} is not a {kind.__name__}; allowed: {_range_text(meta)}") from None
        if value != value:  # NaN
            raise SpecError(f"{what}: {name} is NaN; allowed: {_range_text(meta)}")
        ok = True
        if meta.get("choices") is not None:
            ok = value in meta["choices"]
        else:
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None:
                ok &= value > lo if meta.get("lo_open") else value >= lo
            if hi is not None:
                ok &= value < hi if meta.get("hi_open") else value <= hi
        if not ok:
            raise SpecError(f"{what}: {name}={format_value(value)} is out of range; allowed: {_range_text(meta)}")
        values[name] = value
    return cls(**values)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; every way it can fail is a one-line SpecError naming ``what`` it is."""
    try:
        with Path(path).open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise SpecError(f"{what} {str(path)!r} is a folder") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{what} {str(path)!r} cannot be read: {exc}") from None
