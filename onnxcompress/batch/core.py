"""What one member of a batch is and how it is converted, whatever runs it: the models the inputs
name, their output names, the fingerprint of what a model is converted with, whether a earlier
run already did it (resume), one conversion that never raises, the summary."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress import guards, model_io
from onnxcompress.errors import OnnxCompressError, ToleranceExceeded
from onnxcompress.pipeline import Gates, Options, compress_file
from onnxcompress.recipe import Recipe
from onnxcompress.version import __version__

#: The statuses of a summary, in the order the counts are shown.
STATUSES = ("ok", "skipped (done)", "failed", "gate missed", "interrupted")

_CHUNK = 1 << 20  # hashing reads 1 MiB at a time: a model of gigabytes is never read whole


def collect_models(inputs: tuple[str, ...]) -> list[Path]:
    """The models the inputs name: files, the *.onnx of folders, globs; each once, in order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(path.glob("*.onnx"))
        elif any(ch in item for ch in "*?["):
            found += sorted(Path(p) for p in glob.glob(item))
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def targets(
    models: list[Path], output_dir: Path, names: list[str | None] | None = None
) -> list[Path]:
    """One output per model: the name asked for (a manifest's ``output``), else the model's
    name; a name already taken (the same name from two folders, or a numbered name another
    member already has) gets the first free numbered suffix."""
    names = names or [None] * len(models)
    chosen = {name for name in names if name}
    taken = {model.name for model in models} | chosen
    result = []
    for model, asked in zip(models, names):
        if asked:
            result.append(output_dir / asked)
            continue
        name, count = model.name, 0
        while name in chosen or (count and name in taken):
            count += 1
            name = f"{model.stem}-{count}{model.suffix}"
        chosen.add(name)
        result.append(output_dir / name)
    return result


def report_path(target: Path) -> Path:
    return target.with_suffix(".report.json")


def _outputs(target: Path) -> list[tuple[str, Path]]:
    return [
        ("output", target),
        ("output's external data", model_io.data_file(target)),
        ("report", report_path(target)),
    ]


def refuse_overwrites(models: list[Path], targets: list[Path], output_dir: Path) -> None:
    """Before any model runs: no output of the batch may be an input model or another output.
    (An input's external data lies in its own folder, which then holds an input model that
    an output would overwrite: refused the same way.)"""
    outputs = [item for target in targets for item in _outputs(target)]
    outputs.append(("summary", output_dir / "summary.json"))
    guards.refuse_overwrites(outputs, [model for model in models if model.is_file()])


@dataclass(frozen=True)
class Job:
    """What a model is compressed with (picklable, for worker processes and Ray tasks)."""

    recipe: Recipe
    calibration: str | None
    gates: Gates | None
    options: Options


@dataclass(frozen=True)
class Task:
    """One member of a batch: the model, where it goes, what it is compressed with, and the
    fingerprint of that (stored in its report, compared on the next run)."""

    model: Path
    target: Path
    job: Job
    fingerprint: str


def fingerprint(job: Job, hashes: dict[str, str] | None = None) -> str:
    """SHA-256 of a canonical JSON of everything that changes a model's output bytes or its
    verdict: every pass with all its options (defaults included, so ``rank=2`` from -p and
    ``rank = 2`` from TOML agree), the dims, the calibration and held-out data (path and
    content), the gates, the feed options and the tool's version. ``hashes`` caches data
    hashes by path across the jobs of a batch."""
    options = job.options
    held_out = options.validation_data
    canonical = {
        "tool": __version__,
        "recipe": [{"pass": p.name, **p.config_dict()} for p in job.recipe.build()],
        "dims": dict(sorted((options.dims or {}).items())),
        "calibration": _data_identity(job.calibration, hashes),
        "data": _data_identity(held_out if isinstance(held_out, (str, Path)) else None, hashes),
        "gates": job.gates.as_dict() if job.gates else None,
        "validate": options.validate,
        "feeds": [options.samples, options.batch_size, options.max_feeds, options.seed],
    }
    text = json.dumps(canonical, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_identity(path: str | Path | None, cache: dict[str, str] | None) -> Any:
    if path is None:
        return None
    key = os.path.abspath(path)
    if cache is None or key not in cache:
        digest = _tree_sha256(Path(path))
        if cache is None:
            return {"path": key, "sha256": digest}
        cache[key] = digest
    return {"path": key, "sha256": cache[key]}


def _tree_sha256(path: Path) -> str | None:
    """A file's SHA-256, or one over a folder's files (names and contents, sorted); None for
    what cannot be read (the run itself then reports it)."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path)}\0{file_sha256(item)}\0".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def input_sha256(model: Path) -> dict[str, str]:
    """SHA-256 of the model file and of each external data file it names, by file name; a file
    that is not a readable model hashes alone (its conversion then says what is wrong)."""
    try:
        files = model_io.files_on_disk(model)
    except Exception:  # a corrupt or missing model: no data files to find
        files = [model]
    return {
        os.path.relpath(path, model.parent): file_sha256(path) for path in files if path.is_file()
    }


def input_bytes(model: Path) -> int:
    """Bytes of the model file and its external data (0 when it cannot be read)."""
    try:
        return model_io.size_on_disk(model)
    except Exception:
        return model.stat().st_size if model.is_file() else 0


def is_done(task: Task) -> bool:
    """Whether an earlier run converted this model exactly so: its output and report exist,
    the report says ok, and the recipe fingerprint and the input's hashes match."""
    report_file = report_path(task.target)
    if not task.target.is_file() or not report_file.is_file():
        return False
    try:
        report = json.loads(report_file.read_text())
        provenance = report.get("provenance") or {}
        passed = report["gates"]["passed"] and report["output"] is not None
        same_size = report["after"]["file_bytes"] == model_io.size_on_disk(task.target)
    except Exception:  # an unreadable or foreign report, a damaged output: convert again
        return False
    return (
        passed
        and same_size
        and provenance.get("recipe_fingerprint") == task.fingerprint
        and provenance.get("input_sha256") == input_sha256(task.model)
    )


def convert(task: Task) -> dict[str, Any]:
    """Compress one model of a batch; never raises, the result says what happened. The output
    and its report are written (atomically) here, as soon as the model is done."""
    start = time.perf_counter()
    result: dict[str, Any] = {"model": str(task.model), "output": str(task.target)}
    report_file = report_path(task.target)
    job = task.job
    try:
        provenance = {
            "input_sha256": input_sha256(task.model),
            "recipe_fingerprint": task.fingerprint,
        }
        report = compress_file(
            task.model,
            task.target,
            job.recipe,
            job.calibration,
            job.gates,
            job.options,
            report_path=report_file,
            provenance=provenance,
        )
    except ToleranceExceeded as missed:
        result.update(status="gate missed", detail=str(missed), output=None)
    except OnnxCompressError as exc:
        result.update(status="failed", detail=str(exc), output=None)
    except Exception as exc:  # one broken model must not stop the batch
        result.update(status="failed", detail=f"internal error: {exc}", output=None)
    else:
        result.update(status="ok", report=str(report_file))
        if report.after and report.after.params:
            result["ratio"] = f"{report.before.params / report.after.params:.2f}x"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def failed(task: Task, detail: str, status: str = "failed") -> dict[str, Any]:
    """The result of a model whose conversion did not come back (its worker died, the run was
    interrupted)."""
    return {"model": str(task.model), "output": None, "status": status, "detail": detail}


def skipped(task: Task) -> dict[str, Any]:
    return {
        "model": str(task.model),
        "output": str(task.target),
        "status": "skipped (done)",
        "report": str(report_path(task.target)),
        "detail": "output and report of this recipe and input exist (--force redoes it)",
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: how many models ended in each status, then every model's result."""
    counts = {status: sum(r["status"] == status for r in results) for status in STATUSES}
    shown = {k: v for k, v in counts.items() if v or k != "interrupted"}
    return {"counts": shown, "models": results}


def remove_temp_files(output_dir: Path, targets: list[Path]) -> None:
    """Remove what a killed worker left half-written in the output folder: the temporary
    folders of model saves and the temporary files of atomic text writes of this batch's
    outputs (a terminated process never reaches its own clean-up)."""
    if not output_dir.is_dir():
        return
    ours = {path.name for target in targets for _, path in _outputs(target)} | {"summary.json"}
    for entry in output_dir.iterdir():
        name = entry.name
        if entry.is_dir() and name.startswith(".onnxcompress-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and any(name.startswith(f".{own}.") for own in ours):
            entry.unlink(missing_ok=True)
