"""Benchmark the lowrank pass: size, MACs, onnxruntime latency (side by side, one run) and
fidelity or accuracy on real data, for the trained fixtures and the real models.

    python bench/lowrank.py [--runs 200]

Prints one row per model and setting; ratios are original / compressed for size and MACs,
compressed / original for latency (< 1 is faster).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from onnxcompress import Options, compress, load, synthetic_feeds  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner, compare, measure_latency  # noqa: E402

SETTINGS = ["lowrank:energy=0.9", "lowrank:energy=0.95", "lowrank:ratio=0.25,min_saving=0.3"]


def mnist8_data(real: Path) -> tuple[list[dict], np.ndarray]:
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 1, 28, 28)
    with gzip.open(real / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    return [{"Input3": image.astype(np.float32)} for image in images], labels


def mlp_data(batch: int = 200) -> tuple[list[dict], np.ndarray]:
    _, (x, y) = mnist_split()
    flat = x.reshape(len(x), -1)
    return [{"input": flat[i : i + batch]} for i in range(0, len(flat), batch)], y


def cnn_data(batch: int = 200) -> tuple[list[dict], np.ndarray]:
    _, (x, y) = mnist_split()
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)], y


def accuracy(runner: Runner, feeds: list[dict], labels: np.ndarray) -> float:
    predictions = np.concatenate([runner.run(feed)[0].reshape(-1, 10).argmax(-1) for feed in feeds])
    return float((predictions == labels).mean())


def bench_model(name, source, feeds, labels, dims, runs) -> list[list[str]]:
    rows = []
    reference = Runner(load(str(source)), "original")
    base_accuracy = accuracy(reference, feeds, labels) if labels is not None else None
    for setting in SETTINGS:
        options = Options(dims=dims, validate=False)
        model, report = compress(str(source), [setting], options=options)
        candidate = Runner(model, "compressed")
        totals = report.passes[0].totals()
        if totals["layers_rewritten"] == 0:
            rows.append([name, setting, "0", "-", "-", "-", "-", "no layer qualifies"])
            continue
        ref_ms, cand_ms = measure_latency([reference, candidate], feeds[0], runs)
        if labels is not None:
            fidelity = f"acc {base_accuracy:.4f} -> {accuracy(candidate, feeds, labels):.4f}"
        else:
            metrics = compare(reference, candidate, feeds[:8], latency_runs=0).outputs[0]
            agree = metrics.top1_agreement
            fidelity = f"relL2 {metrics.rel_l2:.3f}" + (f", top1 {agree:.3f}" if agree else "")
        rows.append(
            [
                name,
                setting,
                str(totals["layers_rewritten"]),
                f"{totals['params_before'] / totals['params_after']:.2f}x",
                f"{report.before.params / report.after.params:.2f}x",
                f"{report.before.macs / max(report.after.macs, 1):.2f}x",
                f"{cand_ms / ref_ms:.2f}",
                fidelity,
            ]
        )
        candidate.close()
    reference.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    args = parser.parse_args()
    real = default_real_dir()
    rec_dims = {"p2o.DynamicDimension.0": 1, "x:2": 48, "p2o.DynamicDimension.1": 320}
    rec_feeds = synthetic_feeds(load(str(real / "ppocrv4_rec.onnx")), rec_dims, samples=8)
    fixtures = REPO / "fixtures"
    cases = [
        ("mnist_mlp (fixture)", fixtures / "mnist_mlp.onnx", *mlp_data(), {"N": 200}),
        ("mnist_cnn (fixture)", fixtures / "mnist_cnn.onnx", *cnn_data(), {"N": 200}),
        ("mnist-8", real / "mnist-8.onnx", *mnist8_data(real), {}),
        ("ppocrv4_rec", real / "ppocrv4_rec.onnx", rec_feeds, None, rec_dims),
    ]
    rows = []
    for name, source, feeds, labels, dims in cases:
        rows += bench_model(name, source, feeds, labels, dims, args.runs)
    header = [
        "model",
        "setting",
        "layers",
        "layer params",
        "model params",
        "MACs",
        "latency",
        "fidelity",
    ]
    print("\n".join(table(header, rows)))


if __name__ == "__main__":
    main()
