"""A recipe is an ordered list of pass configurations, kept as data so it can be stored beside a
model and replayed. It comes from TOML, JSON, or ``-p name:key=value,key=value`` options."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcompress.errors import RecipeError, first_line
from onnxcompress.passes import CompressionPass, pass_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

_OPTION_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")
_NONE_WORDS = {"none", "null", ""}
MAX_RECIPE_BYTES = 1 << 20
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Step:
    """One pass of a recipe: its name and the options the user gave (not the defaults)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> CompressionPass:
        cls, options = pass_for(self.name, self.options)
        return cls(build_config(cls, options))

    @classmethod
    def of(cls, name: str, options: dict[str, Any]) -> Step:
        """The step under the name of the pass it builds (``prune:mode=sparsity`` becomes
        ``sparsity``), so that reports and the recipe stored in the model name that pass."""
        pass_cls, options = pass_for(name, options)
        return cls(pass_cls.name, options)


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()

    @classmethod
    def from_options(cls, options: list[str] | tuple[str, ...]) -> Recipe:
        return cls(tuple(parse_option(text) for text in options))

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        text = read_small_text(path, "recipe", MAX_RECIPE_BYTES, RecipeError)
        kind = "JSON" if path.suffix == ".json" else "TOML"
        try:
            data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
            raise RecipeError(f"{path}: not valid {kind}: {first_line(exc)}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        entries = data.get("passes") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise RecipeError(f"{where}: expected a list of passes under 'passes'")
        steps = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise RecipeError(f"{where}: pass #{i + 1} needs a 'name'")
            options = {k: v for k, v in entry.items() if k != "name"}
            steps.append(Step.of(entry["name"], options))
        return cls(tuple(steps))

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [{"name": s.name, **s.options} for s in self.steps]}

    def build(self) -> list[CompressionPass]:
        """Instantiate every pass; all errors are found before any pass runs."""
        return [step.build() for step in self.steps]


def read_small_text(path: Path, kind: str, limit: int, error: type[Exception]) -> str:
    """A regular UTF-8 file of at most ``limit`` bytes (a FIFO would block, /dev/zero never
    ends); each problem is one ``error`` naming the file and the ``kind`` of file."""
    try:
        if not path.is_file():
            what = "no such file" if not path.exists() else "not a regular file"
            raise error(f"{path}: cannot read {kind} ({what})")
        if path.stat().st_size > limit:
            raise error(f"{path}: a {kind} of over {limit >> 20} MiB is not one")
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise error(f"{path}: cannot read {kind} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: the {kind} is not UTF-8 text") from None


def parse_option(text: str) -> Step:
    """Parse ``name`` or ``name:key=value[,key=value...]``."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise RecipeError(f"bad pass option {text!r}: expected name:key=value")
    options: dict[str, Any] = {}
    for item in _OPTION_SPLIT.split(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"bad pass option {text!r}: {item!r} is not key=value")
        if key.strip() in options:
            raise RecipeError(f"bad pass option {text!r}: {key.strip()!r} is given twice")
        options[key.strip()] = value.strip()
    return Step.of(name, options)


def build_config(cls: type[CompressionPass], options: dict[str, Any]) -> Any:
    """Make ``cls.Config`` from user options, converting strings by the declared field types."""
    config_type = cls.Config
    hints = typing.get_type_hints(config_type)
    names = [f.name for f in dataclasses.fields(config_type)]
    values = {}
    for key, raw in options.items():
        if key not in hints:
            raise RecipeError(f"{cls.name}: unknown option {key!r} (options: {', '.join(names)})")
        try:
            values[key] = coerce(raw, hints[key])
        except (ValueError, TypeError) as exc:  # TypeError: a table or list for a scalar
            raise RecipeError(f"{cls.name}: option {key}={raw!r}: {exc}") from None
    try:
        return config_type(**values)
    except ValueError as exc:
        raise RecipeError(f"{cls.name}: {exc}") from None


def coerce(raw: Any, hint: Any) -> Any:
    """Convert a recipe value (string from the command line, or TOML/JSON scalar) to ``hint``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS)
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(raw, inner[0])
    if typing.get_origin(hint) is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(coerce(item, args[0]) for item in items if str(item).strip())
    return _scalar(raw, hint)


def _scalar(raw: Any, hint: type) -> Any:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word not in _BOOL_WORDS:
            raise ValueError("expected true or false")
        return _BOOL_WORDS[word]
    if isinstance(raw, (dict, list)) and hint is not str:
        raise ValueError(f"expected a single {hint.__name__}, not a {type(raw).__name__}")
    if hint is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("expected an integer")
        try:
            return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if hint is str:
        if not isinstance(raw, (str, int, float)):
            raise ValueError(f"expected a word, not a {type(raw).__name__}")
        return str(raw).strip()
    raise ValueError(f"unsupported option type {hint}")
