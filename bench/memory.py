"""Peak memory of every pass on a real model, beside onnxruntime's own static quantization.

    python bench/memory.py [--samples 100] [--batch-size 8] [--only SETTING ...]

Each setting runs ``onnxcompress compress`` on EfficientNet-Lite1 (``shared/real``) with the
ImageNet images as calibration data (a folder holding one ``input.npy``, validation on, as the
command line defaults), in a process of its own under ``/usr/bin/time``: the peak is that whole
process's resident memory (what the machine has to have), the time its wall clock. Beside
them, in a process of its own on the same model and images, onnxruntime's
``quantize_static`` (QDQ, per channel, MinMax, after its ``quant_pre_process``), on batches of
one sample (the lightest way to run it) and of ``--batch-size``, and each peak as a multiple
of the first. Nothing here is asserted: it is a measurement, made side by side in one run.
Needs Pillow (the ``test`` extra) to decode the images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.imagenet import imagenet100, lite1_path  # noqa: E402

SETTINGS = [
    "qdq",
    "qdq:method=percentile",
    "qdq:method=entropy",
    "qdq:method=mse",
    "qdq:bias_correction=true,equalize=true",
    "int4",
    "codebook:bits=4",
    "codebook:bits=4,data_aware=true",
    "prune:ratio=0.1",
    "prune:ratio=0.1,importance=activation,repair=bias",
    "sparsity:ratio=0.5",
    "sparsity:ratio=0.5,repair=lstsq",
    "lowrank:energy=0.9",
]
ORT = "onnxruntime quantize_static (MinMax), batches of {}"


def timed(command: list[str]) -> tuple[float, float] | str:
    """(peak MB, wall seconds) of ``command`` as /usr/bin/time sees it, or its last error
    line. The peak is the child's own: ru_maxrss read inside it would carry this process's
    high-water mark across fork and exec on Linux."""
    command = ["/usr/bin/time", "-f", "peak_kb=%M seconds=%e", *command]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, whatever is installed
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = done.stderr.strip().splitlines() or ["?"]
    if done.returncode != 0:
        return (lines[-2] if len(lines) > 1 else lines[-1])[:100]
    fields = dict(item.split("=") for item in lines[-1].split())
    return int(fields["peak_kb"]) / 1024, float(fields["seconds"])


def compress_command(setting: str, data: Path, batch: int, output: Path) -> list[str]:
    command = [sys.executable, "-m", "onnxcompress", "compress", str(lite1_path())]
    command += ["-o", str(output), "-p", setting, "--calibration", str(data)]
    return [*command, "--batch-size", str(batch)]


def ort_child(data: str, batch: int, output: str) -> None:
    """onnxruntime's static quantization (MinMax, as bench/qdq.py runs it) on the same
    batches, read from the file one at a time, in this (child) process."""
    from bench.qdq import ort_quantize

    images = np.load(Path(data) / "input.npy", mmap_mode="r")
    batches = ({"input": np.array(images[i : i + batch])} for i in range(0, len(images), batch))
    ort_quantize("lite1", "minmax", batches, output)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        ort_child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    from onnxcompress.report import table

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100, help="calibration images")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per feed")
    parser.add_argument("--only", action="append", help="a -p setting to run (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as folder:
        data = Path(folder) / "data"
        data.mkdir()
        np.save(data / "input.npy", imagenet100()[0][: args.samples])
        results = {}
        for batch in dict.fromkeys([1, args.batch_size]):
            child = [sys.executable, __file__, "--ort-child", str(data), str(batch)]
            results[ORT.format(batch)] = timed([*child, f"{folder}/ort.onnx"])
        for setting in args.only or SETTINGS:
            command = compress_command(setting, data, args.batch_size, Path(folder) / "c.onnx")
            results[setting] = timed(command)
    print(f"EfficientNet-Lite1, {args.samples} images in batches of {args.batch_size}")
    print("\n".join(table(["setting", "peak MB", "seconds", "peak / onnxruntime"], rows(results))))


def rows(results: dict[str, tuple[float, float] | str]) -> list[list[str]]:
    base = results[ORT.format(1)]
    out = []
    for setting, result in results.items():
        if isinstance(result, str):
            out.append([setting, result, "", ""])
            continue
        ratio = f"{result[0] / base[0]:.2f}x" if not isinstance(base, str) else ""
        out.append([setting, f"{result[0]:.0f}", f"{result[1]:.1f}", ratio])
    return out


if __name__ == "__main__":
    main()
