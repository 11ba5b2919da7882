"""Benchmark the codebook pass: stored bytes, file size, accuracy or fidelity on real data, and
onnxruntime cost (session creation, first inference, steady-state latency), side by side in one
run; plus the 1-D k-means speed on a 10-million-value tensor and whether onnxruntime
constant-folds the decoders at session creation.

    python bench/codebook.py [--runs 200] [--quick] [--models NAME] [--settings NAME=S;S]

Ratios: bytes and file size original / compressed (> 1 is smaller); first inference and
steady-state latency compressed / original (< 1 is faster); session creation in milliseconds,
original -> compressed (the decoders run, and are folded away, there).

"decode ops left" counts the decoder ops left after onnxruntime's basic optimization level
(constant folding); "same graph" means the fully optimized graph runs the same ops in the same
order as the original's (so latency differences are measurement noise).

Real inputs: MNIST for mnist-8 and the fixtures, rendered text lines for
ppocr_mobile_v2_cls, the photos in ../shared/real/photos for ultraface (Pillow needed for those
two; without it they fall back to synthetic inputs, and the table says so).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from onnxcompress import Options, compress, load, save, synthetic_feeds  # noqa: E402
from onnxcompress.passes.codebook.fit import fit_scalar, kmeans_1d  # noqa: E402
from onnxcompress.probes import unsquashed  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner, compare, measure_latency  # noqa: E402

MNIST8_ALL = "codebook:bits=4,min_size=1,ops=Conv,MatMul"
#: Every scheme on the wide MLP, with and without the data-aware refinement.
WIDE_MLP_SETTINGS = [
    "codebook:bits=4",
    "codebook:bits=4,data_aware=true",
    "codebook:bits=3",
    "codebook:bits=2,data_aware=true",
    "codebook:scheme=binary",
    "codebook:scheme=ternary",
    "codebook:scheme=pq,bits=6,subvector=8",
    "codebook:scheme=pq,bits=6,subvector=8,data_aware=true",
]
DECODE_OPS = {"GatherND", "BitShift", "Mod", "ReduceSum"}


# --- data ---------------------------------------------------------------------------------


def mnist8_data(real: Path) -> tuple[list[dict], np.ndarray]:
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 1, 28, 28)
    with gzip.open(real / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    return [{"Input3": image.astype(np.float32)} for image in images], labels


def mlp_data(flat: bool, batch: int = 200) -> tuple[list[dict], np.ndarray, list[dict]]:
    """Held-out feeds and labels, and calibration feeds from the training split."""
    (x_train, _), (x, y) = mnist_split()
    shape = (-1, 784) if flat else (-1, 1, 28, 28)
    x, x_train = x.reshape(shape), x_train.reshape(shape)
    feeds = [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]
    calibration = [{"input": x_train[i : i + batch]} for i in range(0, 2000, batch)]
    return feeds, y, calibration


def text_lines(count: int = 24) -> list[dict] | None:
    """Rendered text lines [1,3,48,192], upright and rotated 180°, normalized like PaddleOCR."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return None
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 28)
    words = ["invoice 2024", "total: 41.90", "onnx runtime", "Deep Compression", "hello world"]
    feeds = []
    for i in range(count):
        image = Image.new("RGB", (192, 48), (255, 255, 255))
        ImageDraw.Draw(image).text((6, 8), words[i % len(words)], font=font, fill=(20, 20, 20))
        if i % 2:
            image = image.rotate(180)
        array = (np.asarray(image, np.float32) / 255 - 0.5) / 0.5
        feeds.append({"x": array.transpose(2, 0, 1)[None].copy()})
    return feeds


def photos(real: Path) -> list[dict] | None:
    """The real photos as ultraface inputs [1,3,240,320], (x - 127) / 128."""
    try:
        from PIL import Image
    except ImportError:
        return None
    feeds = []
    for path in sorted((real / "photos").glob("*.jpg")):
        image = Image.open(path).convert("RGB").resize((320, 240))
        array = (np.asarray(image, np.float32) - 127.0) / 128.0
        feeds.append({"input": array.transpose(2, 0, 1)[None].copy()})
    return feeds


# --- measurements -------------------------------------------------------------------------


def accuracy(runner: Runner, feeds: list[dict], labels: np.ndarray) -> float:
    predictions = np.concatenate([runner.run(feed)[0].reshape(-1, 10).argmax(-1) for feed in feeds])
    return float((predictions == labels).mean())


def session_costs(paths: list[Path], feed: dict, repeats: int = 7) -> list[tuple[float, float]]:
    """Median (session creation ms, first inference ms) per model, interleaved."""
    samples: list[list[tuple[float, float]]] = [[] for _ in paths]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for _ in range(repeats):
        for path, bucket in zip(paths, samples):
            start = time.perf_counter()
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            created = time.perf_counter()
            session.run(None, feed)
            bucket.append(((created - start) * 1000, (time.perf_counter() - created) * 1000))
    return [tuple(np.median(np.array(bucket), axis=0)) for bucket in samples]


def latency_ratio(reference: Runner, candidate: Runner, feed: dict, runs: int) -> float:
    """Median over 5 blocks of the side-by-side latency ratio (robust to bursts of load from
    other processes on a shared machine)."""
    ratios = []
    for _ in range(5):
        ref_ms, cand_ms = measure_latency([reference, candidate], feed, max(runs // 5, 1))
        ratios.append(cand_ms / ref_ms)
    return float(np.median(ratios))


def optimized_ops(path: Path, level: ort.GraphOptimizationLevel, folder: Path) -> list[str]:
    """Op types of the graph onnxruntime runs after optimizing ``path`` at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    optimized = folder / f"{path.stem}.ort-{int(level)}.onnx"  # never beside a read-only input
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimized), load_external_data=False)
    return [node.op_type for node in model.graph.node]


def decoders_folded(source: Path, out: Path, folder: Path) -> str:
    """'left/in file' decode ops after the basic level (constant folding), and whether the
    fully optimized graph runs the same ops, in the same order, as the original's."""
    in_file = sum(1 for n in onnx.load(str(out)).graph.node if n.op_type in DECODE_OPS)
    basic = optimized_ops(out, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, folder)
    left = sum(1 for op in basic if op in DECODE_OPS)
    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    same = optimized_ops(out, full, folder) == optimized_ops(source, full, folder)
    return f"{left}/{in_file}, {'same' if same else 'other'} graph"


def bench_model(case: dict, runs: int, folder: Path) -> list[list[str]]:
    source, feeds, labels = case["source"], case["feeds"], case.get("labels")
    reference = Runner(load(str(source)), "original")
    base = accuracy(reference, feeds, labels) if labels is not None else None
    rows = []
    for setting in case["settings"]:
        options = Options(dims=case.get("dims"), validate=False)
        model, report = compress(str(source), [setting], case.get("calibration"), options=options)
        totals = report.passes[0].totals()
        out = folder / f"{case['name'].split()[0]}.{len(rows)}.onnx"
        save(model, out)
        candidate = Runner(model, "compressed")
        latency = latency_ratio(reference, candidate, feeds[0], runs)
        (ref_create, ref_first), (cand_create, cand_first) = session_costs([source, out], feeds[0])
        folded = decoders_folded(source, out, folder)
        rows.append(
            [
                case["name"],
                setting.removeprefix("codebook:"),
                str(totals["layers_rewritten"]),
                f"{totals['bytes_before'] / max(totals['bytes_after'], 1):.2f}x",
                f"{source.stat().st_size / out.stat().st_size:.2f}x",
                _fidelity(reference, candidate, feeds, labels, base, case)
                + _logits_error(source, model, feeds),
                f"{ref_create:.0f} -> {cand_create:.0f}",
                f"{cand_first / ref_first:.2f}",
                f"{latency:.2f}",
                folded,
            ]
        )
        candidate.close()
    reference.close()
    return rows


def _fidelity(reference, candidate, feeds, labels, base, case) -> str:
    if labels is not None:
        return f"acc {base:.4f} -> {accuracy(candidate, feeds, labels):.4f}"
    metrics = compare(reference, candidate, feeds, latency_runs=0).outputs
    worst = max(metrics, key=lambda m: m.rel_l2)
    text = f"relL2 {worst.rel_l2:.3f}, cos {worst.cosine:.4f}"
    if case.get("agreement") and worst.top1_agreement is not None:
        text += f", top1 {min(m.top1_agreement or 1 for m in metrics):.3f}"
    return text + f" ({case['data']})"


def _logits_error(source: Path, model, feeds: list[dict]) -> str:
    """For a model whose outputs come out of a Softmax or Sigmoid: the relative L2 error of
    what they squash (the logits). A confident classifier's probabilities barely move until
    a sample nears the boundary, so their error is set by the one or two samples nearest it;
    the logits' error is the steadier measure of how far the weights moved the model."""
    original = load(str(source))
    names = unsquashed(original)
    if names == [value.name for value in original.graph.outputs]:
        return ""
    runners = [Runner(original, "original", names), Runner(model, "compressed", names)]
    noise = signal = 0.0
    for feed in feeds:
        want, got = (runner.capture(feed) for runner in runners)
        for name in names:
            noise += float(np.square(got[name].astype(np.float64) - want[name]).sum())
            signal += float(np.square(want[name].astype(np.float64)).sum())
    for runner in runners:
        runner.close()
    return f"; logits relL2 {np.sqrt(noise / signal):.3f}"


def clustering_speed() -> list[list[str]]:
    """Seconds to cluster 10M float32 values at 4 bits: one codebook, and 1000 of 10,000."""
    values = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)
    rows = []
    start = time.perf_counter()
    kmeans_1d(values, 16, "linear", 0.05, np.random.default_rng(0))
    rows.append(["10M values, 1 codebook (per tensor)", f"{time.perf_counter() - start:.2f} s"])
    start = time.perf_counter()
    fit_scalar(values.reshape(1000, -1), 16)
    rows.append(
        ["10M values, 1000 codebooks (per channel)", f"{time.perf_counter() - start:.2f} s"]
    )
    return rows


def cases(real: Path, quick: bool) -> list[dict]:
    fixtures = REPO / "fixtures"
    wide_feeds, wide_labels, wide_calibration = mlp_data(flat=True)
    cnn_feeds, cnn_labels, _ = mlp_data(flat=False)
    mnist8_feeds, mnist8_labels = mnist8_data(real)
    lines, images = text_lines(), photos(real)
    cls_dims = {"x:0": 1, "x:2": 48, "x:3": 192}
    listed = [
        {
            "name": "mnist-8 (real)",
            "source": real / "mnist-8.onnx",
            "feeds": mnist8_feeds,
            "labels": mnist8_labels,
            "settings": [
                f"{MNIST8_ALL},codebook_dtype=float16",
                MNIST8_ALL,
                f"{MNIST8_ALL.replace('bits=4', 'bits=2')},codebook_dtype=float16",
                "codebook:scheme=binary,min_size=1,ops=Conv,MatMul",
            ],
        },
        {
            "name": "mnist_wide_mlp (fixture)",
            "source": fixtures / "mnist_wide_mlp.onnx",
            "feeds": wide_feeds,
            "labels": wide_labels,
            "calibration": wide_calibration,
            "settings": WIDE_MLP_SETTINGS,
        },
        {
            "name": "mnist_cnn (fixture)",
            "source": fixtures / "mnist_cnn.onnx",
            "feeds": cnn_feeds,
            "labels": cnn_labels,
            "settings": ["codebook:bits=4", "codebook:bits=4,min_size=1"],
        },
        {
            "name": "ppocr_mobile_v2_cls (real)",
            "source": real / "ppocr_mobile_v2_cls.onnx",
            "feeds": lines
            or synthetic_feeds(load(str(real / "ppocr_mobile_v2_cls.onnx")), cls_dims, 8),
            "data": "rendered lines" if lines else "synthetic input",
            "agreement": True,
            "dims": cls_dims,
            "settings": ["codebook:bits=4", "codebook:bits=4,min_size=1"],
        },
        {
            "name": "ultraface_rfb320 (real)",
            "source": real / "ultraface_rfb320.onnx",
            "feeds": images or synthetic_feeds(load(str(real / "ultraface_rfb320.onnx")), {}, 8),
            "data": "photos" if images else "synthetic input",
            "settings": ["codebook:bits=4", "codebook:bits=4,min_size=1"],
        },
    ]
    if quick:
        for case in listed:
            case["settings"] = case["settings"][:1]
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    parser.add_argument("--quick", action="store_true", help="first setting of each model only")
    parser.add_argument("--models", default="", help="only models whose name contains this")
    parser.add_argument(
        "--settings",
        action="append",
        default=[],
        help="NAME=SETTING;SETTING: these settings for the models whose name contains NAME "
        "(e.g. to match another run's bytes: ppocr=codebook:bits=4.9)",
    )
    args = parser.parse_args()
    chosen = dict(item.split("=", 1) for item in args.settings)
    print("\n".join(table(["clustering at 4 bits", "time"], clustering_speed())))
    print()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-codebook-") as folder:
        for case in cases(default_real_dir(), args.quick):
            if args.models not in case["name"]:
                continue
            for name, settings in chosen.items():
                if name in case["name"]:
                    case = dict(case, settings=settings.split(";"))
            rows += bench_model(case, args.runs, Path(folder))
    header = [
        "model",
        "setting",
        "layers",
        "weight bytes",
        "file",
        "accuracy / fidelity",
        "session ms",
        "1st run",
        "latency",
        "decode ops left, ORT graph",
    ]
    print("\n".join(table(header, rows)))


if __name__ == "__main__":
    main()
