"""Benchmark lowrank on convolutions, with real data.

    python bench/lowrank_conv.py [--runs 200] [--part all|errors|latency] [--threads 1,0]

1. Data-aware versus plain SVD at equal rank: the output relative error of every standard 3×3
   conv of ultraface and ppocrv4_det, calibrating on 6 of the photos in ../shared/real/photos
   and measuring on the other 5 (layer outputs of the compressed model against the original's).
2. Latency (onnxruntime, side by side in one run) and accuracy/fidelity for settings on the
   trained CNN fixture (real held-out MNIST) and on ultraface (held-out photos).

Needs Pillow to read the photos (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import load_rgb, photo_paths, ultraface_feeds  # noqa: E402
from onnxcompress import Options, compress, load  # noqa: E402
from onnxcompress.normalize import normalize  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner, compare, measure_latency  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def det_feed(path: Path) -> dict[str, np.ndarray]:
    """PP-OCR detection preprocessing of a photo: BGR 320×320, ImageNet mean/std, NCHW."""
    image = load_rgb(path, 320, 320).astype(np.float32) / 255
    image = ((image - IMAGENET_MEAN) / IMAGENET_STD)[:, :, ::-1]
    return {"x": np.ascontiguousarray(image.transpose(2, 0, 1)[None])}


def conv3x3_outputs(model) -> list[str]:
    """Output names of the standard (group 1) 3×3 convs."""
    names = []
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "Conv" else None
        if weight is None or weight.const_value is None:
            continue
        if (
            tuple(weight.const_value.shape[2:]) == (3, 3)
            and node.attributes.get_int("group", 1) == 1
        ):
            names.append(node.outputs[0].name)
    return names


def layer_errors(source, model, names, feeds) -> dict[str, float]:
    """Relative error of each named layer output, compressed against original, on ``feeds``."""
    teacher = Runner(load(str(source)), extra_outputs=names)
    student = Runner(model, extra_outputs=names)
    diff = dict.fromkeys(names, 0.0)
    norm = dict.fromkeys(names, 0.0)
    for feed in feeds:
        ref, out = teacher.capture(feed), student.capture(feed)
        for name in names:
            diff[name] += float(np.square(out[name] - ref[name]).sum())
            norm[name] += float(np.square(ref[name]).sum())
    return {name: (diff[name] / norm[name]) ** 0.5 for name in names if norm[name] > 0}


def data_aware_versus_plain(real: Path) -> list[str]:
    rows, means = [], {"false": [], "true": []}
    for label, source, feeds in (
        ("ultraface", real / "ultraface_rfb320.onnx", ultraface_feeds(real)),
        ("ppocrv4_det", real / "ppocrv4_det.onnx", [det_feed(p) for p in photo_paths(real)]),
    ):
        calibration, held_out = feeds[:6], feeds[6:]
        original = load(str(source))
        normalize(original)  # Paddle keeps weights in Constant nodes: lift them first
        names = conv3x3_outputs(original)
        for aware in ("false", "true"):
            setting = f"lowrank:scheme=svd,ratio=0.5,ops=Conv,min_saving=-10,data_aware={aware}"
            model, _ = compress(
                str(source), [setting], calibration=calibration, options=Options(validate=False)
            )
            errors = layer_errors(source, model, names, held_out)
            mean = float(np.mean(list(errors.values())))
            means[aware].append(mean)
            rows.append(
                [
                    label,
                    "data-aware" if aware == "true" else "plain SVD",
                    str(len(errors)),
                    f"{mean:.4f}",
                ]
            )
    header = ["model", "fit (ratio=0.5)", "3x3 convs", "mean output rel. error (held out)"]
    plain, aware = np.mean(means["false"]), np.mean(means["true"])
    summary = (
        f"averaged over both models: plain {plain:.4f}, data-aware {aware:.4f} "
        f"({1 - aware / plain:.0%} lower)"
    )
    return [*table(header, rows, left=2), summary]


def cnn_case():
    (x_train, _), (x_held, y_held) = mnist_split()
    calibration = [{"input": x_train[i : i + 64]} for i in range(0, 512, 64)]
    held = [{"input": x_held[i : i + 500]} for i in range(0, 2000, 500)]

    def fidelity(reference: Runner, candidate: Runner) -> str:
        def accuracy(runner):
            predictions = np.concatenate([runner.run(f)[0].argmax(1) for f in held])
            return float((predictions == y_held).mean())

        return f"acc {accuracy(reference):.4f} -> {accuracy(candidate):.4f}"

    return calibration, {"input": x_held[:64]}, fidelity


def ultraface_case(real: Path):
    feeds = ultraface_feeds(real)
    calibration, held = feeds[:6], feeds[6:]

    def fidelity(reference: Runner, candidate: Runner) -> str:
        scores, boxes = compare(reference, candidate, held, latency_runs=0).outputs
        return (
            f"scores relL2 {scores.rel_l2:.3f}, top1 {scores.top1_agreement:.4f}; "
            f"boxes relL2 {boxes.rel_l2:.3f}"
        )

    return calibration, held[0], fidelity


#: Each setting is a recipe: one or more passes. The last of each model is latency-aware:
#: separable where it pays, then rank-16 SVD (one AVX-512 block of channels), each rewrite kept
#: only when it runs >= 1.1x faster alone in onnxruntime on this machine.
LATENCY_AWARE = [
    "lowrank:scheme=separable,rank=1,min_speedup=1.1",
    "lowrank:scheme=svd,rank=16,round_to=16,ops=Conv,min_speedup=1.1",
]
CNN_SETTINGS = [
    ["lowrank:scheme=separable,rank=1,ops=Conv,exclude=/stem/*"],
    ["lowrank:scheme=separable,max_error=0.3,ops=Conv"],
    ["lowrank:scheme=svd,ratio=0.25,ops=Conv"],
    ["lowrank:scheme=tucker2,ratio=0.5,ops=Conv"],
    LATENCY_AWARE,
]
ULTRAFACE_SETTINGS = [
    ["lowrank:scheme=svd,ratio=0.25,ops=Conv"],
    ["lowrank:scheme=separable,rank=1,ops=Conv"],
    ["lowrank:scheme=tucker2,ratio=0.5,ops=Conv"],
    ["lowrank:scheme=svd,max_error=0.1,ops=Conv"],
    LATENCY_AWARE,
]


def speedups(source: Path, model, feed, runs: int, thread_counts) -> list[str]:
    """Original over compressed median latency, side by side, at each thread count."""
    ratios = []
    for threads in thread_counts:
        reference, candidate = (
            Runner(load(str(source)), threads=threads),
            Runner(model, threads=threads),
        )
        ref_ms, cand_ms = measure_latency([reference, candidate], feed, runs)
        ratios.append(f"{ref_ms / cand_ms:.2f}x")
    return ratios


def latency_table(real: Path, runs: int, thread_counts) -> list[str]:
    rows = []
    cases = [
        ("mnist_cnn", REPO / "fixtures" / "mnist_cnn.onnx", cnn_case(), CNN_SETTINGS),
        ("ultraface", real / "ultraface_rfb320.onnx", ultraface_case(real), ULTRAFACE_SETTINGS),
    ]
    for label, source, (calibration, timing_feed, fidelity), settings in cases:
        reference = Runner(load(str(source)))
        for steps in settings:
            model, report = compress(
                str(source), steps, calibration=calibration, options=Options(validate=False)
            )
            rows.append(
                [
                    label,
                    " + ".join(step.removeprefix("lowrank:") for step in steps),
                    "+".join(str(p.totals()["layers_rewritten"]) for p in report.passes),
                    f"{report.before.macs / report.after.macs:.2f}x",
                    *speedups(source, model, timing_feed, runs, thread_counts),
                    fidelity(reference, Runner(model)),
                ]
            )
    header = [
        "model",
        "setting",
        "layers",
        "MACs",
        *(f"speed-up {_threads_label(n)}" for n in thread_counts),
        "accuracy / fidelity (held out)",
    ]
    return table(header, rows, left=2)


def _threads_label(threads: int | None) -> str:
    return "all cores" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    parser.add_argument("--part", choices=("all", "errors", "latency"), default="all")
    parser.add_argument(
        "--threads",
        default="1,0",
        help="onnxruntime intra-op thread counts, comma-separated; 0: its default (all cores)",
    )
    args = parser.parse_args()
    real = default_real_dir()
    if args.part in ("all", "errors"):
        print("\n".join(data_aware_versus_plain(real)), end="\n\n")
    if args.part in ("all", "latency"):
        counts = [int(n) or None for n in args.threads.split(",")]
        print("\n".join(latency_table(real, args.runs, counts)))


if __name__ == "__main__":
    main()
