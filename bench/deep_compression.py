"""Deep-Compression storage on the MNIST models, side by side with the float model in one run:
sparsity with an activation-aware least-squares refit, then codebooks stored sparse, no
retraining. Prints, per model and recipe, the file size and its ratio, accuracy on the held-out
images and on all 10,000, what the stored weights are made of (positions, indices, codebooks,
the rest), and onnxruntime's costs against float's (session creation, steady-state latency
at batch 1 and 100), whether its optimized graph still holds decoder ops; then the time to
compress one 10-million-weight layer at 90% sparsity.

    python bench/deep_compression.py [--runs 200] [--models mlp,cnn,mnist8] [--skip-big]

Data: the MNIST test set in ../shared/real. The fixtures were trained on its first 8,000
images, which calibrate here too; accuracy is quoted on the last 2,000 (held out) and on all
10,000. mnist-8 was trained elsewhere: it calibrates on the first 2,000 (one image a feed, its
input has batch 1) and is measured on the same last 2,000 and all 10,000.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir, load_mnist  # noqa: E402
from onnxcompress import Options, compress, save  # noqa: E402
from onnxcompress.report import table  # noqa: E402

DECODE_OPS = {"ScatterElements", "CumSum", "GatherND", "Gather", "BitShift", "Mod"}
SPARSITY = "sparsity:ratio={ratio},scope=global,repair=lstsq,damping=0.01"
STORE = "min_size=1,data_aware=true,fold_batchnorm=true"
#: Per model: the input name, whether it is flat, batch size of its feeds, the recipes.
MODELS = {
    "mlp": {
        "file": REPO / "fixtures" / "mnist_mlp.onnx",
        "flat": True,
        "recipes": [
            ["codebook:bits=4"],
            [SPARSITY.format(ratio=0.93), f"codebook:size=40x,{STORE}"],
            [SPARSITY.format(ratio=0.95), f"codebook:size=45x,{STORE}"],
        ],
    },
    "cnn": {
        "file": REPO / "fixtures" / "mnist_cnn.onnx",
        "flat": False,
        "recipes": [
            ["codebook:bits=4"],
            [SPARSITY.format(ratio=0.9), f"codebook:size=10x,{STORE}"],
            [SPARSITY.format(ratio=0.9), f"codebook:size=12x,{STORE}"],
            [SPARSITY.format(ratio=0.9), f"codebook:size=30x,{STORE}"],
        ],
    },
    "mnist8": {
        "file": default_real_dir() / "mnist-8.onnx",
        "flat": False,
        "recipes": [
            ["codebook:bits=4,min_size=1"],
            [SPARSITY.format(ratio=0.8), f"codebook:size=8x,{STORE}"],
        ],
    },
}


def data(name: str):
    """Calibration feeds, evaluation batches and labels (all 10,000; the last 2,000 held out)."""
    images, labels = load_mnist()
    if name == "mnist8":  # raw pixels, batch 1
        images = images * 255
        calibration = [{"Input3": images[i : i + 1]} for i in range(2000)]
        return calibration, [{"Input3": images[i : i + 1]} for i in range(len(images))], labels
    if MODELS[name]["flat"]:
        images = images.reshape(len(images), -1)
    calibration = [{"input": images[i : i + 500]} for i in range(0, 8000, 500)]
    return calibration, [{"input": images[i : i + 500]} for i in range(0, len(images), 500)], labels


def accuracy(session: ort.InferenceSession, feeds, labels) -> tuple[float, float]:
    logits = np.concatenate([session.run(None, feed)[0] for feed in feeds]).reshape(len(labels), -1)
    right = logits.argmax(1) == labels
    return float(right[-2000:].mean()), float(right.mean())


def session(path: Path) -> tuple[ort.InferenceSession, float]:
    start = time.perf_counter()
    made = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return made, (time.perf_counter() - start) * 1000


def decoder_ops_left(path: Path, folder: Path) -> int:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return sum(node.op_type in DECODE_OPS for node in graph.node)


def latency(sessions, feed, runs: int) -> list[float]:
    """Median milliseconds per run of each session, interleaved."""
    for s in sessions:
        s.run(None, feed), s.run(None, feed)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for s, bucket in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feed)
            bucket.append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


def parts(report) -> dict[str, int]:
    """Stored bytes of the rewritten weights by kind, over every codebook layer."""
    sums = {"positions": 0, "indices": 0, "codebooks": 0}
    for layer in report.passes[-1].layers:
        detail = layer.detail or {}
        sums["positions"] += detail.get("positions_bytes", 0)
        sums["indices"] += detail.get("indices_bytes", 0)
        sums["codebooks"] += detail.get("codebook_bytes", 0)
    return sums


def bench_model(name: str, runs: int, folder: Path) -> list[list[str]]:
    spec = MODELS[name]
    calibration, feeds, labels = data(name)
    original = Path(spec["file"])
    float_session, float_load = session(original)
    float_accuracy = accuracy(float_session, feeds, labels)
    one = {k: v[:1] for k, v in feeds[0].items()}
    batch = feeds[0] if name != "mnist8" else one
    rows = [
        [
            name,
            "float",
            f"{original.stat().st_size:,}",
            "1.00x",
            f"{float_accuracy[0]:.4f}",
            f"{float_accuracy[1]:.4f}",
            "",
            "",
            f"{float_load:.0f}",
            "1.00",
            "1.00",
            "",
            "",
        ]
    ]
    for recipe in spec["recipes"]:
        start = time.perf_counter()
        model, report = compress(
            str(original),
            recipe,
            calibration=calibration,
            options=Options(validate=False, max_feeds=None),
        )
        seconds = time.perf_counter() - start
        path = folder / f"{name}.onnx"
        save(model, path)
        size = path.stat().st_size
        compressed, load_ms = session(path)
        held, everything = accuracy(compressed, feeds, labels)
        ratios = []
        for feed in (one, batch):
            base, new = latency([float_session, compressed], feed, runs)
            ratios.append(new / base)
        stored = parts(report)
        rest = size - sum(stored.values())
        rows.append(
            [
                name,
                " -> ".join(recipe),
                f"{size:,}",
                f"{original.stat().st_size / size:.2f}x",
                f"{held:.4f}",
                f"{everything:.4f}",
                f"{(float_accuracy[0] - held) * 100:+.2f}",
                f"{stored['positions']:,} / {stored['indices']:,} / {stored['codebooks']:,}"
                f" / {rest:,}",
                f"{float_load:.0f} -> {load_ms:.0f}",
                f"{ratios[0]:.2f}",
                f"{ratios[1]:.2f}",
                str(decoder_ops_left(path, folder)),
                f"{seconds:.1f}",
            ]
        )
    return rows


def big_layer(folder: Path) -> list[str]:
    """A MatMul with a 4096x2560 weight (10.5 M values): 90% sparsity by magnitude, then
    4-bit codebooks stored sparse; the compress call timed."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4096, 2560)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "big",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4096])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 2560])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    onnx.save(proto, path)
    recipe = ["sparsity:ratio=0.9", "codebook:bits=4,granularity=tensor"]
    start = time.perf_counter()
    model, _ = compress(str(path), recipe, options=Options(validate=False))
    seconds = time.perf_counter() - start
    out = folder / "big_out.onnx"
    save(model, out)
    x = rng.standard_normal((1, 4096)).astype(np.float32)
    reference = np.where(np.abs(weight) > np.quantile(np.abs(weight), 0.9), weight, 0)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    error = np.linalg.norm(got[0] - x @ reference) / np.linalg.norm(x @ reference)
    ratio = path.stat().st_size / out.stat().st_size
    return [f"{seconds:.1f}", f"{ratio:.1f}x", f"{error:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--models", default="mlp,cnn,mnist8")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            rows.extend(bench_model(name, args.runs, folder))
        header = [
            "model",
            "recipe",
            "file bytes",
            "smaller",
            "acc held-out 2000",
            "acc all 10000",
            "drop (pts)",
            "positions / indices / codebooks / rest (bytes)",
            "session ms",
            "latency b1",
            "latency b100",
            "decode ops left",
            "compress s",
        ]
        print("\n".join(table(header, rows, left=2)))
        if not args.skip_big:
            print()
            header = ["compress s", "file smaller", "rel error vs the sparse float weight"]
            print("10.5 M-weight MatMul, sparsity:ratio=0.9 -> codebook:bits=4 (stored sparse)")
            print("\n".join(table(header, [big_layer(folder)], left=0)))


if __name__ == "__main__":
    main()
