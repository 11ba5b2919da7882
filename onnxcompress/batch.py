"""``batch``: many models, each into its own output in one folder, one after another or in
worker processes; a model that fails is reported and the rest go on."""

from __future__ import annotations

import glob
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress import guards, model_io
from onnxcompress.errors import OnnxCompressError, ToleranceExceeded
from onnxcompress.pipeline import Gates, Options, compress_file
from onnxcompress.recipe import Recipe


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


def targets(models: list[Path], output_dir: Path) -> list[Path]:
    """One output per model; a file name already taken (the same name from two folders, or a
    numbered name another member already has) gets the first free numbered suffix."""
    taken = {model.name for model in models}
    chosen: set[str] = set()
    targets = []
    for model in models:
        name, count = model.name, 0
        while name in chosen or (count and name in taken):
            count += 1
            name = f"{model.stem}-{count}{model.suffix}"
        chosen.add(name)
        targets.append(output_dir / name)
    return targets


def _outputs(target: Path) -> list[tuple[str, Path]]:
    return [
        ("output", target),
        ("output's external data", model_io.data_file(target)),
        ("report", target.with_suffix(".report.json")),
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
    """What every model of a batch is compressed with (picklable, for worker processes)."""

    recipe: Recipe
    calibration: str | None
    gates: Gates | None
    options: Options


def run(
    models: list[Path],
    targets: list[Path],
    job: Job,
    jobs: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Compress each model into its target, ``jobs`` at a time; one result per model, in order."""
    if jobs <= 1:
        results = []
        for model, target in zip(models, targets):
            results.append(_one(model, target, job))
            if progress:
                progress(1)
        return results
    # spawn, not fork: a forked child can inherit a lock held by one of onnxruntime's or BLAS's
    # threads in the parent and hang for good
    spawn = multiprocessing.get_context("spawn")
    results = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        for result in pool.map(_one, models, targets, [job] * len(models)):
            results.append(result)
            if progress:
                progress(1)
    return results


def _one(model: Path, target: Path, job: Job) -> dict[str, Any]:
    """Compress one model of a batch; never raises, the result says what happened."""
    result: dict[str, Any] = {"model": str(model), "output": str(target)}
    report_path = target.with_suffix(".report.json")
    try:
        report = compress_file(
            model,
            target,
            job.recipe,
            job.calibration,
            job.gates,
            job.options,
            report_path=report_path,
        )
    except ToleranceExceeded as missed:
        return {**result, "status": "gate missed", "detail": str(missed), "output": None}
    except OnnxCompressError as exc:
        return {**result, "status": "failed", "detail": str(exc), "output": None}
    except Exception as exc:  # one broken model must not stop the batch
        return {**result, "status": "failed", "detail": f"internal error: {exc}", "output": None}
    result["status"] = "ok"
    result["report"] = str(report_path)
    if report.after and report.after.params:
        result["ratio"] = f"{report.before.params / report.after.params:.2f}x"
    return result
