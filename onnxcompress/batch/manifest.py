"""A batch manifest: one model a line, each with its own recipe, dims, calibration and held-out
data if it needs them. JSONL (one object a line) or CSV (a header row, then one row a model):

    {"path": "det.onnx", "recipe": "qdq", "dims": "H=640,W=640", "calibration": "det.npz"}
    {"path": "rec.onnx", "recipe": "recipes/rec.toml", "output": "rec-int8.onnx"}

``path`` is required; ``recipe`` is a recipe file (.toml/.json) or passes as ``-p`` takes them,
separated by spaces (or a JSON list); ``dims`` is ``NAME=N,...`` or an object; ``calibration``,
``data`` (held-out) and ``output`` (a file name in the output folder) are optional. Relative
paths are read from the manifest's folder. What a line leaves out comes from the command line.
A bad line stops the batch before any model runs, naming its line."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress.batch.core import Job
from onnxcompress.calibration import parse_dims
from onnxcompress.errors import OnnxCompressError
from onnxcompress.recipe import Recipe, read_small_text

FIELDS = ("path", "recipe", "dims", "calibration", "data", "output")
MAX_MANIFEST_BYTES = 64 << 20


class ManifestError(OnnxCompressError):
    """A manifest that cannot be read, or a line of it that makes no sense."""


@dataclass(frozen=True)
class Member:
    """One model of a batch and what it is compressed with."""

    model: Path
    job: Job
    output: str | None = None  # the output's file name, when the manifest names one


def read(path: Path, defaults: Job, default_recipe: bool) -> list[Member]:
    """Every model the manifest lists. ``defaults`` is the command line's job; its recipe
    counts only when ``default_recipe`` (else a line without one is an error)."""
    text = read_small_text(path, "manifest", MAX_MANIFEST_BYTES, ManifestError)
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _jsonl_rows(text, path)
    recipes: dict[str, Recipe] = {}
    members = []
    for line, row in rows:
        try:
            members.append(_member(row, path.parent, defaults, default_recipe, recipes))
        except OnnxCompressError as exc:
            raise ManifestError(f"{path} line {line}: {exc}") from None
    if not members:
        raise ManifestError(f"{path}: lists no models")
    _refuse_repeated_outputs(members, path, [line for line, _ in rows])
    return members


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ManifestError(f"{path} line {number}: not a JSON object ({exc})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path} line {number}: not a JSON object")
        rows.append((number, row))
    return rows


def _csv_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    unknown = [name for name in header if name not in FIELDS]
    if "path" not in header or unknown:
        what = f"unknown column {unknown[0]!r}" if unknown else "no 'path' column"
        raise ManifestError(f"{path} line 1: {what} (columns: {', '.join(FIELDS)})")
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:  # more cells than the header names
            raise ManifestError(f"{path} line {reader.line_num}: more cells than columns")
        cells = {k: v.strip() for k, v in row.items() if v is not None and v.strip()}
        if cells:
            rows.append((reader.line_num, cells))
    return rows


def _member(
    row: dict[str, Any], base: Path, defaults: Job, default_recipe: bool, recipes: dict
) -> Member:
    unknown = [key for key in row if key not in FIELDS]
    if unknown:
        raise ManifestError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    model = row.get("path")
    if not isinstance(model, str) or not model.strip():
        raise ManifestError("no 'path' (the model file)")
    recipe = _recipe(row.get("recipe"), base, recipes)
    if recipe is None and not default_recipe:
        raise ManifestError("no recipe: give one on this line, or -p/--recipe for all")
    options = defaults.options
    dims = {**(options.dims or {}), **_dims(row.get("dims"))}
    options = dataclasses.replace(options, dims=dims)
    if "data" in row:
        options = dataclasses.replace(options, validation_data=_path(row["data"], base, "data"))
    calibration = defaults.calibration
    if "calibration" in row:
        calibration = _path(row["calibration"], base, "calibration")
    return Member(
        _resolve(model.strip(), base),
        Job(recipe or defaults.recipe, calibration, defaults.gates, options),
        _output_name(row.get("output")),
    )


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _path(value: Any, base: Path, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"'{field}' must be a path")
    return str(_resolve(value.strip(), base))


def _recipe(value: Any, base: Path, cache: dict[str, Recipe]) -> Recipe | None:
    """A recipe file (.toml, .json), passes as -p takes them (spaces between passes), or a
    list of such passes; built now, so a bad option stops the batch before any model."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        specs = [item.strip() for item in value]
    elif isinstance(value, str):
        specs = value.split()
    else:
        raise ManifestError("'recipe' must be a recipe file, passes, or a list of passes")
    if not specs:
        raise ManifestError("'recipe' is empty")
    key = "\0".join(specs)
    if key not in cache:
        if len(specs) == 1 and specs[0].lower().endswith((".toml", ".json")):
            recipe = Recipe.from_file(_resolve(specs[0], base))
        else:
            recipe = Recipe.from_options(specs)
        recipe.build()
        cache[key] = recipe
    return cache[key]


def _dims(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return parse_dims([f"{name}={size}" for name, size in value.items()])
    if isinstance(value, str):
        return parse_dims([item for item in value.split(",") if item.strip()])
    raise ManifestError("'dims' must be NAME=N,... or an object of sizes")


def _output_name(value: Any) -> str | None:
    """A file name inside the output folder (never a path that leaves it)."""
    if value is None:
        return None
    name = value.strip() if isinstance(value, str) else ""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ManifestError(f"'output' must be a file name in the output folder, not {value!r}")
    if not name.endswith(".onnx"):
        raise ManifestError(f"'output' {name!r} must end in .onnx")
    return name


def _refuse_repeated_outputs(members: list[Member], path: Path, lines: list[int]) -> None:
    seen: dict[str, int] = {}
    for member, line in zip(members, lines):
        if member.output is None:
            continue
        if member.output in seen:
            first = seen[member.output]
            raise ManifestError(f"{path} line {line}: output {member.output!r} is line {first}'s")
        seen[member.output] = line
