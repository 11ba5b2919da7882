"""Benchmark the prune pass: params, MACs, onnxruntime latency (side by side, one run) and
fidelity on real data, with and without the least-squares repair.

    python bench/prune.py [--runs 100] [--models cnn,ultraface,det,mnist8]

Ratios are original / pruned for params and MACs, pruned / original for latency (< 1 is
faster). Fidelity is accuracy on held-out real labels where there are labels, else the
relative L2 error of the outputs on held-out real inputs (photos, rendered text pages).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.lowrank import accuracy, mnist8_data  # noqa: E402
from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import ppocr_det_feeds, ultraface_feeds  # noqa: E402
from onnxcompress import Options, ToleranceExceeded, compress, load  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner, measure_latency  # noqa: E402

SETTINGS = [
    "prune:ratio=0.3,repair=none",
    "prune:ratio=0.3",
    "prune:ratio=0.3,round_to=16",
    "prune:ratio=0.5,round_to=16",
    "prune:target_macs=0.5",
    "sparsity:ratio=0.5",
]
#: The masked refit solves one system per output column: only on the small models.
SMALL_ONLY = ["sparsity:ratio=0.5,repair=lstsq"]


def cnn_case():
    (train_x, _), (held_x, held_y) = mnist_split()
    calibration = [{"input": train_x[i : i + 64]} for i in range(0, 512, 64)]
    held_out = [{"input": held_x[i : i + 200]} for i in range(0, len(held_x), 200)]
    return REPO / "fixtures" / "mnist_cnn.onnx", calibration, held_out, held_y


def mnist8_case(real: Path):
    feeds, labels = mnist8_data(real)
    return real / "mnist-8.onnx", feeds[:64], feeds[-2000:], labels[-2000:]


def ultraface_case(real: Path):
    feeds = ultraface_feeds(real)
    return real / "ultraface_rfb320.onnx", feeds[:6], feeds[6:], None


def det_case(real: Path):
    pages = ppocr_det_feeds(12, size=320)
    return real / "ppocrv4_det.onnx", pages[:8], pages[8:], None


def relative_error(reference: Runner, candidate: Runner, feeds) -> float:
    errors = []
    for feed in feeds:
        for want, got in zip(reference.run(feed), candidate.run(feed)):
            errors.append(np.linalg.norm(want - got) / max(np.linalg.norm(want), 1e-12))
    return float(np.mean(errors))


def fidelity(reference: Runner, candidate: Runner, held_out, labels) -> str:
    if labels is not None:
        return f"acc {accuracy(candidate, held_out, labels):.4f}"
    return f"relL2 {relative_error(reference, candidate, held_out):.4f}"


def bench_model(name: str, case, runs: int, settings: list[str]) -> list[list[str]]:
    source, calibration, held_out, labels = case
    reference = Runner(load(str(source)), "original")
    rows = [
        [
            name,
            "original",
            "1.00x",
            "1.00x",
            "1.00",
            fidelity(reference, reference, held_out, labels),
            "-",
        ]
    ]
    for setting in settings:
        start = time.perf_counter()
        try:
            model, report = compress(
                str(source), [setting], calibration=calibration, options=Options(validate=False)
            )
            missed = ""
        except ToleranceExceeded as exc:  # a target out of reach: the result, so marked
            model, report, missed = exc.model, exc.report, " (missed)"
        seconds = time.perf_counter() - start
        candidate = Runner(model, "pruned")
        ref_ms, cand_ms = measure_latency([reference, candidate], held_out[0], runs)
        rows.append(
            [
                name,
                setting + missed,
                f"{report.before.params / report.after.params:.2f}x",
                f"{report.before.macs / max(report.after.macs, 1):.2f}x",
                f"{cand_ms / ref_ms:.2f}",
                fidelity(reference, candidate, held_out, labels),
                f"{seconds:.1f}s",
            ]
        )
        candidate.close()
        print("  done:", name, setting, file=sys.stderr)
    reference.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model")
    parser.add_argument("--models", default="cnn,mnist8,ultraface,det")
    args = parser.parse_args()
    real = default_real_dir()
    cases = {
        "cnn": ("mnist_cnn (fixture)", cnn_case),
        "mnist8": ("mnist-8", lambda: mnist8_case(real)),
        "ultraface": ("ultraface_rfb320", lambda: ultraface_case(real)),
        "det": ("ppocrv4_det 320x320", lambda: det_case(real)),
    }
    rows = []
    for key in args.models.split(","):
        name, make = cases[key]
        small = key in ("cnn", "mnist8")
        rows += bench_model(name, make(), args.runs, SETTINGS + (SMALL_ONLY if small else []))
    header = ["model", "setting", "params", "MACs", "latency", "fidelity", "time"]
    print("\n".join(table(header, rows)))


if __name__ == "__main__":
    main()
