"""The codebook pass on EfficientNet-Lite1 (ImageNet, ``shared/real``) beside a plain script:
k-means per output channel with no data, what a user would otherwise write.

    python bench/codebook_lite1.py [--settings SETTING ...] [--bits 4 5]

Two folds of the 100 labelled images: calibrate on 50 (batches of 5), measure on the other
50; top-1, top-1 agreement with float and the logits' relative squared error are over both
held-out halves (100 predictions); "photos" is agreement with float on the 11 photos,
averaged over the two folds. "weights" is the conv and Gemm weights' bytes over what stores
them (indices, codebooks, channel order); "file" the file size ratio. Seconds are the
compress call's wall time, the mean of the two folds. Peak memory is bench/memory.py's.
Needs Pillow (the ``test`` extra). Nothing is asserted: a measurement, side by side in one run.
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
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.imagenet import feeds, folds, imagenet100, lite1_path, photos  # noqa: E402
from onnxcompress import Options, compress, save  # noqa: E402
from onnxcompress.passes.codebook.fit import fit_scalar  # noqa: E402
from onnxcompress.report import table  # noqa: E402

SETTINGS = [
    "codebook:bits=4",
    "codebook:bits=4.57",
    "codebook:bits=5",
    "codebook:bits=3",
    "codebook:size=8x",
    "codebook:bits=4,data_aware=true",
    "codebook:bits=4,granularity=channel",  # the byte-only rule this issue replaced
]
MIN_SIZE = 1024  # the pass's default: smaller weights stay float in both tools


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [images[i : i + 10] for i in range(0, len(images), 10)]
    return np.concatenate([session.run(None, {"input": batch})[0] for batch in batches])


def plain_kmeans(source: Path, target: Path, bits: int) -> int:
    """Every conv/Gemm weight of at least MIN_SIZE values replaced by a k-means codebook
    per output channel (2^bits float32 codewords), as a script would; the bytes it stores."""
    model = onnx.load(str(source))
    stored = 0
    for tensor in model.graph.initializer:
        weight = numpy_helper.to_array(tensor)
        if weight.size < MIN_SIZE or weight.ndim < 2:
            continue
        rows = weight.reshape(len(weight), -1)  # Conv [O, ...]; Gemm transB [O, I]
        fit = fit_scalar(rows.astype(np.float64), 1 << bits)
        approx = fit.decode().reshape(weight.shape).astype(weight.dtype)
        tensor.CopyFrom(numpy_helper.from_array(approx, tensor.name))
        stored += rows.size * bits // 8 + len(rows) * (1 << bits) * 4
    onnx.save(model, str(target))
    return stored


def weight_bytes(report) -> tuple[int, int]:
    """The rewritten weights' bytes before, and what stores them now (a weight left float
    counts as rewritten to itself)."""
    before = after = 0
    for layer in report.passes[0].layers:
        if layer.action == "rewritten":
            before += layer.bytes_before
            kinds = ("indices_bytes", "codebook_bytes", "order_bytes")
            after += sum(layer.detail.get(kind, 0) for kind in kinds)
        elif (layer.reason or "").startswith("left float"):
            before += layer.bytes_before or 0
            after += layer.bytes_before or 0
    return before, after


def measure(make, folder: Path) -> dict:
    """``make(fold, calibration images, path)`` writes a model and returns (bytes before,
    bytes after) of the weights; the figures over both folds."""
    images, _ = imagenet100()
    shots = photos()
    float_logits, float_photos = logits(lite1_path(), images), logits(lite1_path(), shots)
    hits, agree, noise, signal, photo, seconds, sizes = 0, 0, 0.0, 0.0, [], [], None
    for fold in (0, 1):
        (calibration, _), (held_out, held_labels) = folds(fold)
        path = folder / f"fold{fold}.onnx"
        start = time.perf_counter()
        sizes = make(calibration, path)
        seconds.append(time.perf_counter() - start)
        index = np.arange(1 - fold, 100, 2)
        got, want = logits(path, held_out), float_logits[index]
        hits += int((got.argmax(-1) == held_labels).sum())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        noise += float(np.square(got - want).sum())
        signal += float(np.square(want).sum())
        photo.append(float((logits(path, shots).argmax(-1) == float_photos.argmax(-1)).mean()))
    # the script writes float weights back: its file is what its codebooks would take
    file_bytes = sizes[2] if len(sizes) > 2 else path.stat().st_size
    file_ratio = lite1_path().stat().st_size / file_bytes
    return {
        "top1": hits / 100,
        "agree": agree / 100,
        "nsr": noise / signal,
        "photos": float(np.mean(photo)),
        "seconds": float(np.mean(seconds)),
        "weights": sizes[0] / sizes[1],
        "file": file_ratio,
    }


def ours(setting: str):
    def make(calibration: np.ndarray, path: Path) -> tuple[int, int]:
        model, report = compress(
            str(lite1_path()), [setting], feeds(calibration, 5), options=Options(validate=False)
        )
        save(model, path)
        return weight_bytes(report)

    return make


def script(bits: int):
    def make(_calibration: np.ndarray, path: Path) -> tuple[int, int, int]:
        stored = plain_kmeans(lite1_path(), path, bits)
        model = onnx.load(str(lite1_path()))
        before = sum(
            numpy_helper.to_array(t).nbytes
            for t in model.graph.initializer
            if np.prod(t.dims) >= MIN_SIZE and len(t.dims) >= 2
        )
        return before, stored, lite1_path().stat().st_size - before + stored

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", nargs="*", default=SETTINGS, help="-p settings of ours")
    parser.add_argument("--bits", nargs="*", type=int, default=[4, 5], help="the script's bits")
    args = parser.parse_args()
    images, labels = imagenet100()
    float_top1 = float((logits(lite1_path(), images).argmax(-1) == labels).mean())
    rows = [["float", "-", f"{float_top1:.2f}", "1.00", "0", "1.00", "1.00", "1.00", "-"]]
    runs = [(s, "onnxcompress", ours(s)) for s in args.settings]
    runs += [(f"k-means per channel, {b} bits", "plain script", script(b)) for b in args.bits]
    with tempfile.TemporaryDirectory(prefix="bench-codebook-lite1-") as folder:
        for name, tool, make in runs:
            m = measure(make, Path(folder))
            rows.append(
                [
                    name,
                    tool,
                    f"{m['top1']:.2f}",
                    f"{m['agree']:.2f}",
                    f"{m['nsr']:.3f}",
                    f"{m['photos']:.2f}",
                    f"{m['weights']:.2f}x",
                    f"{m['file']:.2f}x",
                    f"{m['seconds']:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    header = ["setting", "tool", "top-1", "agree", "logits err²", "photos", "weights", "file", "s"]
    print("\n".join(table(header, rows)))


if __name__ == "__main__":
    main()
