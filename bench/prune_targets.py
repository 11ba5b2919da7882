"""Filter pruning to a global target on real networks, original beside pruned, in one run.

    python bench/prune_targets.py [--models lite1,ultraface,det,cnn] [--runs 50]

EfficientNet-Lite1 (``shared/real``): two folds of the 100 labelled images, calibrate on 50
(batches of 5), measure top-1 and top-1 agreement with float on the other 50; each fold runs
``onnxcompress compress`` in a child process under /usr/bin/time, so its wall time and peak
memory are the whole command's own (probes, allocation, removal, refit, the side-by-side
timing). Ultraface: calibrate on 6 photos, relative L2 of each output on the other 5.
PP-OCRv4 det: calibrate on 8 rendered pages (320×320), relative L2 of the map on 4 others.
The trained MNIST CNN fixture: accuracy on 2,000 held-out digits.

Speed-up is the original's median latency over the pruned one's (batch 1, onnxruntime, one
thread and all threads, interleaved runs): > 1 is faster. "uniform" rows cut every group at
one ratio by filter norm (the rule Torch-Pruning's L1 pruner applies; its own figure on
Lite1 at 25% without fine-tuning was top-1 0.001). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.lowrank import accuracy  # noqa: E402
from fixtures.imagenet import folds, imagenet100, lite1_path  # noqa: E402
from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import ppocr_det_feeds, ultraface_feeds  # noqa: E402
from onnxcompress import Options, compress, save  # noqa: E402
from onnxcompress.report import table  # noqa: E402
from onnxcompress.validate import Runner, measure_latency  # noqa: E402

TARGETS = ["prune:target_latency=1.3", "prune:target_latency=1.15", "prune:target_macs=0.75"]
UNIFORM = "prune:ratio=0.25,importance=l1,damping=0.1,round_to=8"


def speedups(source: Path, pruned: Path, feed: dict, runs: int) -> tuple[float, float]:
    """Original over pruned median latency, one thread and all threads."""
    found = []
    for threads in (1, None):
        runners = [Runner(str(p), str(p.name), threads=threads) for p in (source, pruned)]
        before, after = measure_latency(runners, feed, runs)
        found.append(before / after)
        for runner in runners:
            runner.close()
    return found[0], found[1]


def child(setting: str, source: Path, data: Path, output: Path) -> tuple[float, float, str]:
    """(peak MB, seconds, the pass's notes) of one compress command."""
    command = ["/usr/bin/time", "-f", "peak_kb=%M seconds=%e", sys.executable, "-m"]
    command += ["onnxcompress", "compress", str(source), "-o", str(output), "-p", setting]
    command += ["--calibration", str(data), "--batch-size", "5", "--no-validate"]
    command += ["--keep-failed"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = done.stderr.strip().splitlines()
    fields = dict(item.split("=") for item in lines[-1].split())
    notes = [
        line.strip().removeprefix("note: ")
        for line in done.stdout.splitlines()
        if line.strip().startswith("note: target_")
    ]
    missed = [line for line in lines if "gate missed" in line]
    return int(fields["peak_kb"]) / 1024, float(fields["seconds"]), "; ".join(notes + missed)


def lite1_rows(runs: int, folder: Path) -> list[list[str]]:
    images, labels = imagenet100()
    source = lite1_path()
    reference = Runner(str(source), "original")
    float_top = _predictions(reference, images)
    rows = [["lite1", "original", f"{(float_top == labels).mean():.2f}", "1.00", "-", "-", "-"]]
    for setting in [*TARGETS, UNIFORM]:
        for fold in (0, 1):
            (calibration, _), (held, held_labels) = folds(fold)
            data = folder / f"cal{fold}"
            data.mkdir(exist_ok=True)
            np.save(data / "input.npy", calibration)
            output = folder / f"lite1_{fold}.onnx"
            peak, seconds, notes = child(setting, source, data, output)
            pruned = Runner(str(output), "pruned")
            top = _predictions(pruned, held)
            pruned.close()
            index = np.arange(1 - fold, 100, 2)
            one, every = speedups(source, output, {"input": held[:1]}, runs)
            rows.append(
                [
                    f"lite1 fold {fold}",
                    setting,
                    f"{(top == held_labels).mean():.2f}",
                    f"{(top == float_top[index]).mean():.2f}",
                    f"{one:.2f} / {every:.2f}",
                    f"{seconds:.0f} s / {peak:.0f} MB",
                    notes[:90],
                ]
            )
            print("  done:", rows[-1][:2], file=sys.stderr)
    reference.close()
    return rows


def _predictions(runner: Runner, images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [runner.run({"input": images[i : i + 10]})[0].argmax(-1) for i in range(0, len(images), 10)]
    )


def relative_errors(source: Path, output: Path, held: list[dict]) -> str:
    reference, candidate = Runner(str(source), "original"), Runner(str(output), "pruned")
    names = reference.output_names
    errors = np.zeros(len(names))
    for feed in held:
        for i, (want, got) in enumerate(zip(reference.run(feed), candidate.run(feed))):
            errors[i] += np.linalg.norm(want - got) / max(np.linalg.norm(want), 1e-12) / len(held)
    reference.close()
    candidate.close()
    return ", ".join(f"{name} {error:.4f}" for name, error in zip(names, errors))


def other_rows(key: str, runs: int, folder: Path) -> list[list[str]]:
    real = default_real_dir()
    if key == "ultraface":
        source, feeds = real / "ultraface_rfb320.onnx", ultraface_feeds(real)
        calibration, held, labels = feeds[:6], feeds[6:], None
    elif key == "det":
        source, pages = real / "ppocrv4_det.onnx", ppocr_det_feeds(12, size=320)
        calibration, held, labels = pages[:8], pages[8:], None
    else:
        (train_x, _), (held_x, held_y) = mnist_split()
        source = REPO / "fixtures" / "mnist_cnn.onnx"
        calibration = [{"input": train_x[i : i + 64]} for i in range(0, 512, 64)]
        held = [{"input": held_x[i : i + 200]} for i in range(0, 2000, 200)]
        labels = held_y[:2000]
    rows = [[key, "original", _fidelity(source, source, held, labels), "1.00", "-", "-", "-"]]
    for setting in [*TARGETS, UNIFORM]:
        start = time.perf_counter()
        output = folder / f"{key}.onnx"
        try:
            model, report = compress(
                str(source), [setting], calibration, options=Options(validate=False)
            )
            notes = [n for n in report.passes[0].notes if n.startswith("target_")]
        except Exception as exc:  # a refused target: its figures are in the message
            model, notes = getattr(exc, "model", None), [str(exc)]
        if model is None:
            rows.append([key, setting, "-", "-", "-", "-", notes[0][:90]])
            continue
        save(model, output)
        seconds = time.perf_counter() - start
        one_sample = {name: array[:1] for name, array in held[0].items()}
        one, every = speedups(source, output, one_sample, runs)
        rows.append(
            [
                key,
                setting,
                _fidelity(source, output, held, labels),
                "-",
                f"{one:.2f} / {every:.2f}",
                f"{seconds:.0f} s",
                "; ".join(notes)[:90],
            ]
        )
        print("  done:", key, setting, file=sys.stderr)
    return rows


def _fidelity(source: Path, output: Path, held, labels) -> str:
    if labels is None:
        return relative_errors(source, output, held)
    runner = Runner(str(output), "model")
    found = f"acc {accuracy(runner, held, labels):.4f}"
    runner.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="lite1,ultraface,det,cnn")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency figure")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as folder:
        for key in args.models.split(","):
            if key == "lite1":
                rows += lite1_rows(args.runs, Path(folder))
            else:
                rows += other_rows(key, args.runs, Path(folder))
    header = ["model", "setting", "top-1 / fidelity", "agree", "speed-up 1t / all", "cost"]
    print("\n".join(table([*header, "pass notes"], rows, left=2)))


if __name__ == "__main__":
    main()
