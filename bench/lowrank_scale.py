"""How long lowrank's data-aware fits take, and what they keep (issue 15).

    python bench/lowrank_scale.py [--part speed|accuracy|ocr|errors|all]

- speed: EfficientNet-Lite1 with the 100 ImageNet images as ``--calibration`` (a .npz), through
  the command line as a user runs it, each run in a fresh process: ``lowrank:max_error=0.1``,
  and the README's latency-aware two-pass recipe, first with an empty timing cache, then again
  with the cache the first run left. Seconds (wall, validation included) and the process's
  peak RSS.
- accuracy: Lite1 top-1 on held-out images, two folds (fit on 50, measure on the other 50;
  100 predictions in all), for each recipe with student inputs (the default: each layer fitted
  to what the model compressed so far feeds it) and teacher inputs (one sweep for all layers).
- ocr: ppocrv4_rec with rendered text lines (bench/int4.py's) as calibration,
  ``lowrank:max_error=0.1``: seconds, peak RSS, CTC text agreement with the original on other
  lines.
- errors: for Lite1 ``max_error=0.1``, each rewritten layer's output error as the statistics
  predict it (the report) beside the one measured in onnxruntime on the calibration images
  (the compressed model's layer output against the original's).

Nothing is asserted: a measurement. Another process on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.imagenet import feeds, folds, imagenet100, lite1_path  # noqa: E402
from fixtures.mnist import default_real_dir  # noqa: E402
from onnxcompress import Options, compress, load  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner  # noqa: E402

MAX_ERROR = ["lowrank:max_error=0.1"]
LATENCY_AWARE = [
    "lowrank:scheme=separable,rank=1,min_speedup=1.1",
    "lowrank:scheme=svd,rank=16,round_to=16,ops=Conv,min_speedup=1.1",
]
#: The README's recipe: rewrites most layers at a fixed rank, so teacher inputs (one sweep).
TEACHER_INPUTS = [f"{step},inputs=teacher" for step in LATENCY_AWARE]
#: Runs the command line in this process and prints its peak RSS (KiB) last, on stderr.
_MEASURED_CLI = (
    "import resource, sys\n"
    "from onnxcompress.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:], standalone_mode=False)\n"
    "finally:\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "    print(f'peak_rss_kib={peak}', file=sys.stderr)\n"
)


def run_cli(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of ``onnxcompress ARGS`` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"onnxcompress {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    peak = next(line for line in done.stderr.splitlines() if line.startswith("peak_rss_kib="))
    return seconds, int(peak.split("=")[1]) / 1024, done.stdout


def recipe_args(steps: list[str]) -> list[str]:
    return [arg for step in steps for arg in ("-p", step)]


def speed(work: Path) -> list[str]:
    images, _ = imagenet100()
    data = work / "lite1_100.npz"
    np.savez(data, input=images)
    cache = {"ONNXCOMPRESS_CACHE_DIR": str(work / "cache")}
    rows = []
    cases = [
        ("max_error=0.1", MAX_ERROR, ""),
        ("latency-aware recipe", TEACHER_INPUTS, "empty timing cache"),
        ("latency-aware recipe", TEACHER_INPUTS, "second run, cache kept"),
    ]
    for label, steps, note in cases:
        out = work / "lite1.onnx"
        args = ["compress", str(lite1_path()), "-o", str(out), *recipe_args(steps)]
        args += ["--calibration", str(data), "--report", str(work / "report.json")]
        seconds, peak, _ = run_cli(args, cache)
        report = json.loads((work / "report.json").read_text())
        rewritten = "+".join(str(p["totals"]["layers_rewritten"]) for p in report["passes"])
        rows.append([label, note, rewritten, f"{seconds:.1f}", f"{peak:.0f}"])
    header = ["Lite1, 100 images", "", "layers rewritten", "seconds", "peak RSS MB"]
    return table(header, rows, left=2)


def top1(model, images: np.ndarray, labels: np.ndarray) -> float:
    runner = Runner(model, "model")
    try:
        predictions = np.concatenate([runner.run(f)[0].argmax(1) for f in feeds(images, 10)])
    finally:
        runner.close()
    return float((predictions == labels).mean())


def accuracy() -> list[str]:
    """Rows printed as they come (the student-input runs of the recipe take minutes)."""
    original = load(str(lite1_path()))
    line = "{:<15} {:<8} {:>26} {:>15}".format
    print(line("setting", "inputs", "top-1 (held out, 2 folds)", "seconds a fold"), flush=True)
    cases = [("float", None, "")]
    # the recipe with student inputs takes minutes a fold (two sweeps a rewritten layer)
    cases += [("latency-aware", LATENCY_AWARE, "teacher")]
    cases += [("max_error=0.1", MAX_ERROR, "student"), ("max_error=0.1", MAX_ERROR, "teacher")]
    for label, steps, inputs in cases:
        correct, total, seconds = 0.0, 0, 0.0
        for fold in (0, 1):
            (calibration, _), (held, held_labels) = folds(fold)
            model = original
            if steps is not None:
                recipe = [f"{step},inputs={inputs}" for step in steps]
                model, took = timed_compress(recipe, feeds(calibration, 5))
                seconds += took
            correct += top1(model, held, held_labels) * len(held)
            total += len(held)
        print(line(label, inputs, f"{correct / total:.2f}", f"{seconds / 2:.1f}"), flush=True)
    return []


def timed_compress(recipe: list[str], calibration) -> tuple[object, float]:
    start = time.perf_counter()
    model, _ = compress(
        str(lite1_path()), recipe, calibration=calibration, options=Options(validate=False)
    )
    return model, time.perf_counter() - start


def ocr(work: Path) -> list[str]:
    """ppocrv4_rec, calibrated on 64 rendered lines, text agreement on 64 others."""
    from bench.int4 import ctc_decode, text_lines

    source = default_real_dir() / "ppocrv4_rec.onnx"
    data, out = work / "lines.npz", work / "rec.onnx"
    np.savez(data, x=text_lines(64, seed=0))
    args = ["compress", str(source), "-o", str(out), *recipe_args(MAX_ERROR)]
    args += ["--calibration", str(data), "--report", str(work / "rec.json")]
    seconds, peak, _ = run_cli(args)
    report = json.loads((work / "rec.json").read_text())
    held = text_lines(64, seed=1)
    texts = []
    for model in (str(source), str(out)):
        runner = Runner(model, "model")
        texts.append(
            ctc_decode(
                np.concatenate([runner.run({"x": held[i : i + 8]})[0] for i in range(0, 64, 8)])
            )
        )
        runner.close()
    agreement = np.mean([a == b for a, b in zip(*texts)])
    rewritten = report["passes"][0]["totals"]["layers_rewritten"]
    row = ["max_error=0.1", str(rewritten), f"{seconds:.1f}", f"{peak:.0f}", f"{agreement:.3f}"]
    header = ["ppocrv4_rec, 64 lines", "layers", "seconds", "peak RSS MB", "text agreement"]
    return table(header, [row], left=1)


def errors() -> list[str]:
    """Predicted (statistics) against measured (onnxruntime) output error per layer."""
    images, _ = imagenet100()
    calibration = feeds(images, 8)
    model, report = compress(
        str(lite1_path()), MAX_ERROR, calibration=calibration, options=Options(validate=False)
    )
    layers = [layer for layer in report.passes[0].rewritten if layer.output_error is not None]
    names = {layer.node: _output_of(model, layer.node) for layer in layers}
    wanted = [name for name in names.values() if name]
    measured = _layer_errors(model, wanted, calibration)
    rows = []
    for layer in layers:
        name = names[layer.node]
        got = measured.get(name) if name else None
        off = f"{got / layer.output_error - 1:+.1%}" if got and layer.output_error else "-"
        seen = f"{got:.4f}" if got is not None else "(merged)"
        rows.append([layer.node, f"{layer.output_error:.4f}", seen, off])
    header = ["Lite1 max_error=0.1 layer", "predicted", "measured", "off by"]
    return table(header, rows, left=1)


def _output_of(model, node_name: str) -> str | None:
    """The output value of the rewritten layer (it keeps its name unless merged away)."""
    original = load(str(lite1_path()))
    node = next(n for n in original.graph if n.name == node_name)
    name = node.outputs[0].name
    made = {value.name for n in model.graph for value in n.outputs}
    return name if name in made else None


def _layer_errors(model, names: list[str], calibration) -> dict[str, float]:
    """Relative error of each named value, compressed against original, over all feeds."""
    teacher = Runner(load(str(lite1_path())), "original", extra_outputs=names)
    student = Runner(model, "compressed", extra_outputs=names)
    diff, norm = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for feed in calibration:
        for ours, theirs in zip(student.capture_parts(feed), teacher.capture_parts(feed)):
            for name in names:
                diff[name] += float(np.square(ours[name] - theirs[name], dtype=np.float64).sum())
                norm[name] += float(np.square(theirs[name], dtype=np.float64).sum())
    teacher.close(), student.close()
    return {name: (diff[name] / norm[name]) ** 0.5 for name in names if norm[name] > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--part", choices=("speed", "accuracy", "ocr", "errors", "all"), default="all"
    )
    args = parser.parse_args()
    default_real_dir()
    with tempfile.TemporaryDirectory(prefix="lowrank-scale-") as folder:
        work = Path(folder)
        if args.part in ("speed", "all"):
            print("\n".join(speed(work)), end="\n\n", flush=True)
        if args.part in ("ocr", "all"):
            print("\n".join(ocr(work)), end="\n\n", flush=True)
        if args.part in ("errors", "all"):
            print("\n".join(errors()), end="\n\n", flush=True)
        if args.part in ("accuracy", "all"):
            accuracy()


if __name__ == "__main__":
    main()
