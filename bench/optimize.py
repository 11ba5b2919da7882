"""optimize on EfficientNet-Lite1 (ImageNet, ``shared/real``) and PP-OCRv4's recognizer
beside the single-pass recipe a user would write for the same size, in one run.

    python bench/optimize.py [--models lite1,rec] [--targets 8x 12x] [--no-explore]

Two folds of the 100 labelled images: optimize calibrates and judges its candidates on one
half (50 images, batches of 5; top-1 agreement and relative L2 on that half), and top-1 and
agreement with float are measured on the other half, which neither tool has seen; figures
are over both held-out halves (100 predictions). "single pass" is ``codebook:size=T``
alone, compressed with the same calibration. Seconds are optimize's wall time per fold
(every trial compressed and validated).

ppocrv4_rec: calibrate on 16 rendered text lines, judge the candidates with ``--metric``
(CTC-decoded text agreement with the original) on 32 other lines, and measure the chosen
model's text agreement on 32 lines neither has seen, beside ``codebook:size=6x`` alone.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.codebook_lite1 import logits  # noqa: E402
from bench.int4 import REC_DIMS, ctc_decode, text_lines  # noqa: E402
from fixtures.imagenet import feeds, folds, imagenet100, lite1_path  # noqa: E402
from fixtures.mnist import default_real_dir  # noqa: E402
from onnxcompress import Options, Target, Tolerance, compress, optimize, save  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner  # noqa: E402


def held_out_figures(path: Path, fold: int, float_logits: np.ndarray) -> tuple[int, int]:
    """(correct, agreeing with float) on the fold's held-out half."""
    (_, _), (held_out, labels) = folds(fold)
    got = logits(path, held_out).argmax(-1)
    want = float_logits[np.arange(1 - fold, 100, 2)].argmax(-1)
    return int((got == labels).sum()), int((got == want).sum())


def run(target: str, explore: bool, folder: Path, float_logits: np.ndarray) -> list[list[str]]:
    rows = {"optimize": [0, 0, [], [], []], "single pass": [0, 0, [], [], []]}
    original = lite1_path().stat().st_size
    for fold in (0, 1):
        (calibration, _), _ = folds(fold)
        data = feeds(calibration, 5)
        start = time.perf_counter()
        model, result = optimize(str(lite1_path()), Target.parse(f"size={target}"), data,
                                 explore=explore)  # fmt: skip
        seconds = time.perf_counter() - start
        print(result.to_text(), flush=True)
        single, _ = compress(str(lite1_path()), [f"codebook:size={target}"], data,
                             options=Options(validate=False))  # fmt: skip
        for name, chosen, recipe in (
            ("optimize", model, result.chosen.recipe if result.chosen else ["-"]),
            ("single pass", single, [f"codebook:size={target}"]),
        ):
            path = folder / f"{name.replace(' ', '_')}{fold}.onnx"
            save(chosen, path)
            hits, agree = held_out_figures(path, fold, float_logits)
            entry = rows[name]
            entry[0] += hits
            entry[1] += agree
            entry[2].append(original / path.stat().st_size)
            entry[3].append(" ".join(recipe))
            entry[4].append(seconds if name == "optimize" else float("nan"))
    return [
        [f"{target} {name}", f"{np.mean(r[2]):.2f}x", f"{r[0] / 100:.2f}", f"{r[1] / 100:.2f}",
         f"{np.nanmean(r[4]):.0f}" if name == "optimize" else "-", " | ".join(r[3])]
        for name, r in rows.items()
    ]  # fmt: skip


def text_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Share of lines whose greedy CTC decoding is the original's."""
    same = [a == b for a, b in zip(ctc_decode(reference[0]), ctc_decode(candidate[0]))]
    return float(np.mean(same))


def rec(target: str, explore: bool, folder: Path) -> list[list[str]]:
    source = default_real_dir() / "ppocrv4_rec.onnx"
    lines = {seed: [{"x": line[None]} for line in text_lines(n, seed)]
             for seed, n in ((0, 16), (1, 32), (2, 32))}  # fmt: skip
    options = Options(dims=REC_DIMS, validation_data=lines[1])
    start = time.perf_counter()
    tolerance = Tolerance(metric_floor=0.98)
    model, result = optimize(str(source), Target.parse(f"size={target}"), lines[0], tolerance,
                             options, explore, text_agreement)  # fmt: skip
    seconds = time.perf_counter() - start
    print(result.to_text(), flush=True)
    single, _ = compress(str(source), [f"codebook:size={target}"], lines[0],
                         options=Options(dims=REC_DIMS, validate=False))  # fmt: skip
    with Runner(str(source), "original") as original:
        want = [original.run(feed) for feed in lines[2]]
    rows = []
    for name, chosen in (("optimize", model), ("single pass", single)):
        if chosen is None:
            rows.append([f"rec {target} {name}", "-", "-", "-", f"{seconds:.0f}", "none met"])
            continue
        path = folder / f"rec_{name.replace(' ', '_')}.onnx"
        save(chosen, path)
        with Runner(str(path), name) as runner:
            agree = np.mean([text_agreement(w, runner.run(f)) for w, f in zip(want, lines[2])])
        recipe = " ".join(result.chosen.recipe) if name == "optimize" else "codebook alone"
        rows.append([f"rec {target} {name}", f"{source.stat().st_size / path.stat().st_size:.2f}x",
                     "-", f"{agree:.3f}", f"{seconds:.0f}" if name == "optimize" else "-",
                     recipe])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite1,rec")
    parser.add_argument("--targets", nargs="+", default=["8x", "12x"])
    parser.add_argument("--rec-target", default="6x")
    parser.add_argument("--no-explore", action="store_true")
    args = parser.parse_args()
    images, labels = imagenet100()
    float_logits = logits(lite1_path(), images)
    float_top1 = float((float_logits.argmax(-1) == labels).mean())
    rows = [["float", "1.00x", f"{float_top1:.2f}", "1.00", "-", "-"]]
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as folder:
        if "lite1" in models:
            for target in args.targets:
                rows += run(target, not args.no_explore, Path(folder), float_logits)
        if "rec" in models:
            rows += rec(args.rec_target, not args.no_explore, Path(folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    header = ["setting", "file smaller", "top-1", "agree", "s/fold", "recipe (fold 0 | 1)"]
    print("rec rows: agree is CTC text agreement with the original on 32 unseen lines")
    print("\n".join(table(header, rows)))
    print(f"peak RSS of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
