"""batch on Ray against the local executor, side by side in one run, then a resumed run.

    python bench/batch.py [--recipe qdq] [--jobs 2]

20 input files in a temporary folder: the six real models of ``../shared/real`` twice each
(EfficientNet-Lite1, PP-OCRv4 det and rec, the PP-OCR orientation classifier, UltraFace,
mnist-8) and the three trained fixtures plus mnist-8 again twice each, under distinct names,
listed in a JSONL manifest that gives each the ``--dim`` values it needs. One recipe for all
(``-p qdq`` by default: it runs on every one of them, synthetic calibration).

Each run is ``onnxcompress batch`` in a process of its own, timed by its wall clock:
1. ``--executor local --jobs N`` (worker processes);
2. ``--executor ray --jobs N`` (a Ray head of N CPUs started by the command and shut down
   after it: its start is part of the time), into another folder;
3. the same Ray command again: every model is done, so every one is skipped.
Printed: the wall times, Ray's overhead (run 2 / run 1 - 1), whether every output of run 2 is
byte-identical to run 1's, and run 3 as a fraction of run 2. Needs the ``ray`` extra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("ONNXCOMPRESS_REAL_DIR", REPO.parent / "shared" / "real"))

# (source, --dim values it needs, copies)
MODELS = [
    (REAL / "efficientnet_lite1.onnx", "batch=1", 2),
    (
        REAL / "ppocrv4_det.onnx",
        "p2o.DynamicDimension.0=1,p2o.DynamicDimension.1=160,p2o.DynamicDimension.2=160",
        2,
    ),
    (REAL / "ppocrv4_rec.onnx", "p2o.DynamicDimension.0=1,x:2=48,p2o.DynamicDimension.1=160", 2),
    (REAL / "ppocr_mobile_v2_cls.onnx", "x:0=1,x:2=48,x:3=192", 2),
    (REAL / "ultraface_rfb320.onnx", None, 2),
    (REAL / "mnist-8.onnx", None, 4),
    (REPO / "fixtures" / "mnist_mlp.onnx", "N=1", 2),
    (REPO / "fixtures" / "mnist_cnn.onnx", "N=1", 2),
    (REPO / "fixtures" / "mnist_wide_mlp.onnx", "N=1", 2),
]


def collection(folder: Path) -> Path:
    """Copy every model under distinct names; write the manifest; return its path."""
    lines = []
    for source, dims, copies in MODELS:
        for copy in range(copies):
            name = f"{source.stem}-{copy}.onnx"
            shutil.copyfile(source, folder / name)
            lines.append({"path": name, **({"dims": dims} if dims else {})})
    manifest = folder / "models.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def batch(manifest: Path, out: Path, recipe: str, jobs: int, executor: str) -> float:
    """Wall seconds of one ``onnxcompress batch`` process; stops the bench if it fails."""
    command = [sys.executable, "-m", "onnxcompress", "batch", "--manifest", str(manifest)]
    command += ["-o", str(out), "-p", recipe, "--jobs", str(jobs), "--executor", executor]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{executor} batch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def statuses(out: Path) -> dict[str, int]:
    return json.loads((out / "summary.json").read_text())["counts"]


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.onnx")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="qdq")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp)
        models = folder / "models"
        models.mkdir()
        manifest = collection(models)
        count = len(manifest.read_text().splitlines())
        print(f"{count} models, -p {args.recipe}, --jobs {args.jobs}, {os.cpu_count()} CPUs")
        local = batch(manifest, folder / "local", args.recipe, args.jobs, "local")
        print(f"local --jobs {args.jobs}: {local:6.1f} s  {statuses(folder / 'local')}")
        on_ray = batch(manifest, folder / "ray", args.recipe, args.jobs, "ray")
        print(f"ray (local head):  {on_ray:6.1f} s  {statuses(folder / 'ray')}")
        print(f"ray overhead: {on_ray / local - 1:+.1%} (ray / local = {on_ray / local:.3f})")
        same = digests(folder / "local") == digests(folder / "ray")
        print(f"outputs byte-identical, ray vs local: {same} ({len(digests(folder / 'ray'))})")
        again = batch(manifest, folder / "ray", args.recipe, args.jobs, "ray")
        print(f"ray again (resume): {again:5.1f} s  {statuses(folder / 'ray')}")
        print(f"resumed run / first ray run: {again / on_ray:.1%}")


if __name__ == "__main__":
    main()
