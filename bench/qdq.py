"""Benchmark the qdq pass against onnxruntime.quantization.quantize_static, side by side.

    python bench/qdq.py [--samples 100] [--runs 50] [--only lite1,ultraface,cls,cnn] [--skip-aids]

For each model and calibration method, both tools quantize with the same calibration data
(weights int8 per channel, activations uint8 asymmetric, QDQ format), each in its own
subprocess so that its peak memory (ru_maxrss of that whole process) and calibration wall time
are its own. Then fidelity (or accuracy) and onnxruntime latency are measured side by side in
one process. Latency is the quantized model over the float original (< 1 is faster).

lite1 is EfficientNet-Lite1 on the 100 labelled ImageNet images in two folds (calibrate on 50,
measure on the other 50): top-1 and agreement with float over both held-out halves, agreement
on the 11 photos; calibration time and peak memory per fold (mean, max).

A second table shows cross-layer equalization and bias correction on ultraface (depthwise
convs), before and after; a third, int4 weight-only on ppocrv4_rec.
Needs Pillow (the ``test`` extra) to decode the photos.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.imagenet import feeds as imagenet_feeds  # noqa: E402
from fixtures.imagenet import folds, lite1_path, photos  # noqa: E402
from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import cls_inputs, photo_crops, ultraface_inputs  # noqa: E402

METHODS = ["minmax", "percentile", "entropy", "entropy-pure-kl", "mse", "mse+keep_float=2"]
#: Our settings per method; "entropy-pure-kl" is TensorRT's KL without our error guard.
SETTINGS = {
    "entropy": "qdq:method=entropy",
    "entropy-pure-kl": "qdq:method=entropy,entropy_guard=false",
    "mse+keep_float=2": "qdq:method=mse,keep_float=2",
}
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
PERCENTILE = 99.99


def model_path(name: str) -> Path:
    real = default_real_dir()
    if name.startswith("lite1"):
        return lite1_path()
    return {
        "ultraface": real / "ultraface_rfb320.onnx",
        "cls": real / "ppocr_mobile_v2_cls.onnx",
        "cnn": REPO / "fixtures" / "mnist_cnn.onnx",
    }[name]


def data(name: str, samples: int) -> tuple[list[dict], list[dict], np.ndarray | None]:
    """(calibration feeds, evaluation feeds, evaluation labels or None): disjoint samples.

    ``lite1:K`` is EfficientNet-Lite1 on fold K of imagenet100 (50 images each way)."""
    if name.startswith("lite1:"):
        (calibration, _), (held_out, labels) = folds(int(name.split(":")[1]))
        return imagenet_feeds(calibration), imagenet_feeds(held_out, 10), labels
    if name == "ultraface":
        images = ultraface_inputs(samples + 20, seed=1)
        feeds = [{"input": image} for image in images]
        return feeds[:samples], feeds[samples:], None
    if name == "cls":
        lines = cls_inputs(samples + 100, seed=2)
        feeds = [{"x": lines[i : i + 10]} for i in range(0, len(lines), 10)]
        return feeds[: samples // 10], feeds[samples // 10 :], None
    (train_x, _), (held_x, held_y) = mnist_split()
    calibration = [{"input": train_x[i : i + 10]} for i in range(0, samples, 10)]
    evaluation = [{"input": held_x[i : i + 200]} for i in range(0, len(held_x), 200)]
    return calibration, evaluation, held_y


# -- child processes: one quantization each ------------------------------------------------


def quantize_child(tool: str, name: str, method: str, samples: int, output: str) -> None:
    """Quantize in this process and print {seconds, peak_mb} as JSON."""
    calibration, _, _ = data(name, samples)
    start = time.perf_counter()
    if tool == "ours":
        from onnxcompress import Options, compress, save

        model, _ = compress(
            str(model_path(name)),
            [SETTINGS.get(method, f"qdq:method={method},percentile={PERCENTILE}")],
            calibration,
            options=Options(validate=False),
        )
        save(model, output)
    else:
        ort_quantize(name, method, calibration, output)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def ort_quantize(name: str, method: str, calibration: Iterable[dict], output: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    import onnx

    prepared = str(Path(output).with_suffix(".pre.onnx"))
    model = onnx.load(str(model_path(name)))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:  # per-channel scales need opset 13 (our pipeline upgrades the same way)
        model = onnx.version_converter.convert_version(model, 13)
    onnx.save(model, prepared)
    try:  # its recommended step: shape inference and BN folding
        quant_pre_process(prepared, prepared)
    except AssertionError:  # its symbolic shape inference gives up on some exports (cls)
        quant_pre_process(prepared, prepared, skip_symbolic_shape=True)
    quantize_static(
        prepared,
        output,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        extra_options={"CalibPercentile": PERCENTILE},
    )


def run_child(tool: str, name: str, method: str, samples: int, output: Path) -> dict | None:
    # /usr/bin/time reports the child's own peak: ru_maxrss read inside the child would carry
    # this (larger) parent's high-water mark across fork and exec on Linux.
    command = ["/usr/bin/time", "-f", "peak_kb=%M", sys.executable, __file__, "--child"]
    command += [tool, name, method, str(samples), str(output)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines() or ["?"]
    if done.returncode != 0:
        return {"error": (lines[-2] if len(lines) > 1 else lines[-1])[:80]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_mb"] = int(lines[-1].removeprefix("peak_kb=")) / 1024
    return result


# -- side-by-side measurement --------------------------------------------------------------


def fidelity(reference, candidate, feeds, labels) -> str:
    from onnxcompress.validate import compare

    outputs = compare(reference, candidate, feeds, latency_runs=0).outputs
    if labels is not None:  # accuracy on the labels, and agreement with the float model
        predictions = np.concatenate([candidate.run(f)[0].argmax(-1) for f in feeds])
        versus_float = f"relL2 {outputs[0].rel_l2:.4f} top1 {outputs[0].top1_agreement:.4f}"
        return f"acc {np.mean(predictions == labels):.4f}, {versus_float}"
    worst = max(o.rel_l2 for o in outputs)
    agreement = min(
        (o.top1_agreement for o in outputs if o.top1_agreement is not None), default=None
    )
    return f"relL2 {worst:.4f}" + (f" top1 {agreement:.3f}" if agreement is not None else "")


def bench_model(name: str, samples: int, runs: int, folder: Path) -> list[list[str]]:
    from onnxcompress.validate import Runner, measure_latency

    _, evaluation, labels = data(name, samples)
    reference = Runner(str(model_path(name)), "original")
    rows = []
    if labels is not None:
        base = np.concatenate([reference.run(f)[0].argmax(-1) for f in evaluation])
        rows.append([name, "float", "-", f"acc {np.mean(base == labels):.4f}", "1.00", "-", "-"])
    for method in METHODS:
        for tool in ("ours", "onnxruntime"):
            if tool == "onnxruntime" and method not in ORT_METHODS:
                rows.append([name, method, tool, "n/a (no such method)", "-", "-", "-"])
                continue
            output = folder / f"{name}-{method}-{tool}.onnx"
            result = run_child(tool, name, method, samples, output)
            if "error" in result:
                rows.append([name, method, tool, f"failed: {result['error']}", "-", "-", "-"])
                continue
            try:
                candidate = Runner(str(output), tool)
            except Exception as exc:  # a tool's output that onnxruntime refuses is a result too
                rows.append([name, method, tool, f"cannot run: {str(exc)[:60]}", "-", "-", "-"])
                continue
            ref_ms, cand_ms = measure_latency([reference, candidate], evaluation[0], runs)
            rows.append(
                [
                    name,
                    method,
                    tool,
                    fidelity(reference, candidate, evaluation, labels),
                    f"{cand_ms / ref_ms:.2f}",
                    f"{result['seconds']:.1f}",
                    f"{result['peak_mb']:.0f}",
                ]
            )
            candidate.close()
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    reference.close()
    return rows


def bench_lite1(runs: int, folder: Path) -> list[list[str]]:
    """EfficientNet-Lite1, two folds: calibrate on 50 images, measure on the other 50; top-1
    and agreement with float over the 100 held-out predictions, agreement on the photos."""
    from onnxcompress.validate import Runner, measure_latency

    reference = Runner(str(lite1_path()), "original")
    pictures = imagenet_feeds(photos(), 11)
    float_photos = reference.run(pictures[0])[0].argmax(-1)
    rows = [["lite1", "float", "-", _lite1_float(reference), "1.00", "-", "-"]]
    for method in METHODS:
        for tool in ("ours", "onnxruntime"):
            if tool == "onnxruntime" and method not in ORT_METHODS:
                rows.append(["lite1", method, tool, "n/a (no such method)", "-", "-", "-"])
                continue
            hits, agree, photo_agree, seconds, peaks, latency = [], [], [], [], [], None
            for fold in (0, 1):
                output = folder / f"lite1-{fold}-{method}-{tool}.onnx"
                result = run_child(tool, f"lite1:{fold}", method, 50, output)
                if "error" in result:
                    break
                _, evaluation, labels = data(f"lite1:{fold}", 50)
                candidate = Runner(str(output), tool)
                predicted = np.concatenate([candidate.run(f)[0].argmax(-1) for f in evaluation])
                expected = np.concatenate([reference.run(f)[0].argmax(-1) for f in evaluation])
                hits.append(predicted == labels)
                agree.append(predicted == expected)
                photo_agree.append(candidate.run(pictures[0])[0].argmax(-1) == float_photos)
                seconds.append(result["seconds"])
                peaks.append(result["peak_mb"])
                if latency is None:
                    ref_ms, cand_ms = measure_latency([reference, candidate], evaluation[0], runs)
                    latency = cand_ms / ref_ms
                candidate.close()
            if len(hits) < 2:
                rows.append(["lite1", method, tool, f"failed: {result['error']}", "-", "-", "-"])
                continue
            fidelity = (
                f"top1 {np.mean(hits):.2f}, agree {np.mean(agree):.2f}, "
                f"photos {np.mean(photo_agree):.2f}"
            )
            time_and_memory = [f"{np.mean(seconds):.1f}", f"{max(peaks):.0f}"]
            rows.append(["lite1", method, tool, fidelity, f"{latency:.2f}", *time_and_memory])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    reference.close()
    return rows


def _lite1_float(reference) -> str:
    hits = []
    for fold in (0, 1):
        _, evaluation, labels = data(f"lite1:{fold}", 50)
        predicted = np.concatenate([reference.run(f)[0].argmax(-1) for f in evaluation])
        hits.append(predicted == labels)
    return f"top1 {np.mean(hits):.2f}"


def accuracy_aids(samples: int) -> list[list[str]]:
    """Equalization and bias correction on ultraface (depthwise convs), before and after."""
    from onnxcompress import Options, compress
    from onnxcompress.validate import Runner, compare

    calibration, evaluation, _ = data("ultraface", samples)
    path = str(model_path("ultraface"))
    reference = Runner(path, "original")
    rows = []
    for weights in ("per_channel=false", "per_channel=true"):
        for aids in (
            "",
            ",equalize=true",
            ",bias_correction=true",
            ",equalize=true,bias_correction=true",
        ):
            setting = f"qdq:{weights}{aids}"
            model, _ = compress(path, [setting], calibration, options=Options(validate=False))
            candidate = Runner(model, "quantized")
            outputs = compare(reference, candidate, evaluation, latency_runs=0).outputs
            rows.append([setting] + [f"{o.rel_l2:.4f}" for o in outputs])
            candidate.close()
    reference.close()
    return rows


def int4_rows(runs: int) -> list[list[str]]:
    from onnxcompress import Options, compress
    from onnxcompress.validate import Runner, compare, measure_latency

    path = str(default_real_dir() / "ppocrv4_rec.onnx")
    lines = photo_crops(48, 320, 8, seed=3) / 127.5 - 1.0
    feeds = [{"x": lines[i : i + 1]} for i in range(8)]
    dims = {"p2o.DynamicDimension.0": 1, "x:2": 48, "p2o.DynamicDimension.1": 320}
    reference = Runner(path, "original")
    rows = []
    for setting in (
        "int4:block_size=32",
        "int4:block_size=128,symmetric=false",
        "int4:matmulnbits=true",
    ):
        model, report = compress(path, [setting], feeds, options=Options(validate=False, dims=dims))
        totals = report.passes[0].totals()
        candidate = Runner(model, "int4")
        output = compare(reference, candidate, feeds, latency_runs=0).outputs[0]
        ref_ms, cand_ms = measure_latency([reference, candidate], feeds[0], runs)
        rows.append(
            [
                setting,
                str(totals["layers_rewritten"]),
                f"{totals['bytes_before'] / totals['bytes_after']:.2f}x",
                f"relL2 {output.rel_l2:.4f} top1 {output.top1_agreement:.3f}",
                f"{cand_ms / ref_ms:.2f}",
            ]
        )
        candidate.close()
    reference.close()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tool, name, method, samples, output = sys.argv[2:7]
        quantize_child(tool, name, method, int(samples), output)
        return
    from onnxcompress.report import table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100, help="calibration samples")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency")
    parser.add_argument("--only", default="lite1,ultraface,cls,cnn", help="models to compare")
    parser.add_argument("--skip-aids", action="store_true", help="skip tables 2 and 3")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-qdq-") as folder:
        for name in args.only.split(","):
            if name == "lite1":
                rows += bench_lite1(args.runs, Path(folder))
            else:
                rows += bench_model(name, args.samples, args.runs, Path(folder))
    header = ["model", "method", "tool", "fidelity", "latency", "calib s", "peak MB"]
    print("\n".join(table(header, rows)))
    if args.skip_aids:
        return
    print()
    aids_header = ["ultraface setting", "relL2 scores", "relL2 boxes"]
    print("\n".join(table(aids_header, accuracy_aids(args.samples))))
    print()
    int4_header = ["ppocrv4_rec setting", "layers", "weight bytes", "fidelity", "latency"]
    print("\n".join(table(int4_header, int4_rows(args.runs))))


if __name__ == "__main__":
    main()
