"""Behaviour snapshot: every bench recipe on the real models and fixtures, recorded so that a
refactor can prove it changed nothing.

    python bench/snapshot.py --out before.json            # on the old code
    python bench/snapshot.py --out after.json --compare before.json

Per case it records the SHA-256 of the compressed model as serialized, the report (timings and
latencies left out) and the outputs on one held-out feed. ``--compare`` prints, per case,
``identical`` (same bytes), ``same outputs`` (bytes differ, outputs equal to 1e-6) or what
changed. Timing-driven settings (``min_speedup``) are left out: their choices follow the
machine's noise. Validation is off; the outputs are compared directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.codebook import WIDE_MLP_SETTINGS  # noqa: E402
from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import ppocr_det_feeds, ultraface_feeds  # noqa: E402
from onnxcompress import Options, compress  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.validate import Runner  # noqa: E402

_TIMING_KEYS = ("speedup", "latency_ms_reference", "latency_ms_candidate", "latency_ratio")

LOWRANK_FC = ["lowrank:energy=0.9", "lowrank:energy=0.95", "lowrank:ratio=0.25,min_saving=0.3"]
PRUNE = [
    "prune:ratio=0.3,repair=none",
    "prune:ratio=0.3",
    "prune:ratio=0.3,round_to=16",
    "prune:ratio=0.5,round_to=16",
    "prune:target_macs=0.5",
    "prune:mode=sparsity,ratio=0.5",
    "prune:ratio=0.3,importance=activation",
    "prune:ratio=0.3,repair=bias",
]
CONV = [
    "lowrank:scheme=svd,ratio=0.25,ops=Conv",
    "lowrank:scheme=separable,rank=1,ops=Conv",
    "lowrank:scheme=tucker2,ratio=0.5,ops=Conv",
    "lowrank:scheme=svd,max_error=0.1,ops=Conv",
    "lowrank:scheme=svd,ratio=0.5,ops=Conv,min_saving=-10,data_aware=false",
    "lowrank:scheme=svd,ratio=0.5,ops=Conv,min_saving=-10,data_aware=true",
]
QDQ = [
    "qdq:method=percentile",
    "qdq:method=entropy",
    "qdq:method=minmax",
    "qdq:per_channel=false,equalize=true,bias_correction=true",
]
CODEBOOK_WIDE = [*WIDE_MLP_SETTINGS, "codebook:granularity=group,group_size=4"]
INT4 = [
    "int4:block_size=32",
    "int4:block_size=128,symmetric=false",
    "int4:block_size=32,matmulnbits=true",
    "int4:block_size=128",
    "int4:form=matmulnbits",
    "int4:form=folded",
    "int4:form=dq",
]


def mnist(flat: bool, count: int = 512, batch: int = 64):
    (train_x, _), (held_x, _) = mnist_split()
    shape = (-1, 784) if flat else (-1, 1, 28, 28)
    train_x, held_x = train_x.reshape(shape), held_x.reshape(shape)
    calibration = [{"input": train_x[i : i + batch]} for i in range(0, count, batch)]
    return calibration, {"input": held_x[:64]}


def mnist8(real: Path):
    (train_x, _), (held_x, _) = mnist_split()
    raw = lambda x: (x.reshape(-1, 1, 28, 28) * 255.0).astype(np.float32)  # noqa: E731
    calibration = [{"Input3": raw(train_x[i : i + 1])} for i in range(16)]
    return calibration, {"Input3": raw(held_x[:1])}


def cases(real: Path, quick: bool) -> list[tuple[str, Path, list, dict, list[list[str]]]]:
    fixtures = REPO / "fixtures"
    flat, flat_held = mnist(flat=True)
    images, images_held = mnist(flat=False)
    photos = ultraface_feeds(real)
    pages = ppocr_det_feeds(8, size=160)
    m8, m8_held = mnist8(real)
    single = lambda settings: [[s] for s in settings]  # noqa: E731
    mlp = [*LOWRANK_FC, "lowrank:max_error=0.1", "lowrank:rank=16", "qdq:method=percentile"]
    cnn = [
        *single(["lowrank:scheme=separable,rank=1,ops=Conv,exclude=/stem/*"]),
        *single(["lowrank:scheme=separable,max_error=0.3,ops=Conv", *CONV[:3], *PRUNE]),
        *single(["prune:mode=sparsity,ratio=0.5,repair=lstsq", QDQ[0], "lowrank:energy=0.9"]),
        *single(["prune:mode=sparsity,ratio=0.5,scope=global", "codebook:bits=4,min_size=1"]),
        ["prune:ratio=0.3", "codebook:bits=4"],
        ["lowrank:scheme=separable,rank=1,ops=Conv", "lowrank:scheme=svd,rank=16,ops=Conv"],
    ]
    m8_settings = [
        "lowrank:energy=0.9",
        "codebook:bits=4,min_size=1,ops=Conv,MatMul",
        "codebook:bits=4,min_size=1,ops=Conv,MatMul,codebook_dtype=float16",
        "qdq:method=minmax",
        "prune:ratio=0.3",
    ]
    found = [
        ("mnist_mlp", fixtures / "mnist_mlp.onnx", flat, flat_held, single(mlp)),
        ("mnist_cnn", fixtures / "mnist_cnn.onnx", images, images_held, cnn),
        ("mnist_wide_mlp", fixtures / "mnist_wide_mlp.onnx", flat, flat_held,
         single(CODEBOOK_WIDE)),
        ("mnist-8", real / "mnist-8.onnx", m8, m8_held, single(m8_settings)),
        ("ultraface", real / "ultraface_rfb320.onnx", photos[:6], photos[6],
         single([*CONV, *PRUNE, *QDQ, "codebook:bits=4", "qdq:sensitivity=true"])),
        ("ppocr_cls", real / "ppocr_mobile_v2_cls.onnx", None, None,
         single(["codebook:bits=4", "qdq:method=percentile", "prune:ratio=0.3"])),
        ("ppocrv4_det", real / "ppocrv4_det.onnx", pages[:6], pages[6],
         single(["prune:ratio=0.3,round_to=16", CONV[4], CONV[5]])),
        ("ppocrv4_rec", real / "ppocrv4_rec.onnx", None, None,
         single(["lowrank:energy=0.9", *INT4])),
        ("efficientnet_lite1", real / "efficientnet_lite1.onnx", None, None,
         single(["qdq", "codebook:bits=4", "prune:ratio=0.1,round_to=16"])),
    ]  # fmt: skip
    if quick:
        found = [(n, p, c, h, s[:2]) for n, p, c, h, s in found]
    return found


def held_feed(source: Path, calibration, held):
    """A held-out feed; models without real data get seeded synthetic ones (dims fixed)."""
    if held is not None:
        return held
    from onnxcompress.calibration import synthetic_feeds

    return synthetic_feeds(ir.load(str(source)), _dims(source), seed=7)[0]


def _dims(source: Path) -> dict:
    name = source.name
    if name.startswith("ppocrv4_rec"):
        return {"x:0": 1, "x:2": 48, "x:3": 160}
    if name.startswith("ppocr_mobile"):
        return {"x:0": 1, "x:2": 48, "x:3": 192}
    if name.startswith("efficientnet"):
        return {"batch": 1}
    return {}


def run_case(source: Path, steps: list[str], calibration, held, out_dir: Path, key: str) -> dict:
    from onnxcompress.calibration import parse_dims

    options = Options(validate=False, dims=parse_dims(_dim_args(source)))
    started = time.perf_counter()
    try:
        model, report = compress(str(source), steps, calibration=calibration, options=options)
    except OnnxCompressError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    elapsed = time.perf_counter() - started
    proto = ir.to_proto(model).SerializeToString(deterministic=True)
    runner = Runner(model, "compressed")
    try:
        outputs = runner.run(held)
    finally:
        runner.close()
    np.savez(out_dir / f"{key}.npz", *outputs)
    return {
        "sha256": hashlib.sha256(proto).hexdigest(),
        "report": _without_timings(report.to_dict()),
        "seconds": round(elapsed, 2),
    }


def _dim_args(source: Path) -> list[str]:
    return [f"{k}={v}" for k, v in _dims(source).items()]


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in _TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def compare(before: dict, after: dict, before_dir: Path, after_dir: Path) -> int:
    differing = 0
    for key, old in before.items():
        new = after.get(key)
        verdict = _verdict(key, old, new, before_dir, after_dir)
        differing += verdict not in ("identical", "same outputs", "same error")
        print(f"{key:90s} {verdict}")
    print(f"{differing} of {len(before)} cases differ")
    return differing


def _verdict(key, old, new, before_dir, after_dir) -> str:
    if new is None:
        return "missing"
    if "error" in old or "error" in new:
        if old.get("error") == new.get("error"):
            return "same error"
        if "error" in new:
            return f"now fails: {new['error'][:120]}"
        return f"now runs (was: {old['error'][:80]})"
    if old["sha256"] == new["sha256"]:
        return "identical"
    a, b = (np.load(folder / f"{_slug(key)}.npz") for folder in (before_dir, after_dir))
    worst = max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a.files)
    same_report = old["report"] == new["report"]
    if worst <= 1e-6:
        return "same outputs" + ("" if same_report else " (report differs)")
    return f"outputs differ by {worst:.3g}" + ("" if same_report else "; report differs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="snapshot JSON to write")
    parser.add_argument("--compare", help="an earlier snapshot JSON to compare with")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--match", default="", help="only cases whose recipe contains this")
    parser.add_argument("--quick", action="store_true", help="two settings per model")
    args = parser.parse_args()
    real = default_real_dir()
    out = Path(args.out)
    out_dir = out.with_suffix(".outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    results = {}
    for name, source, calibration, held, settings in cases(real, args.quick):
        if only and name not in only:
            continue
        feed = held_feed(source, calibration, held)
        for steps in settings:
            key = f"{name} {' + '.join(steps)}"
            if args.match not in key:
                continue
            results[key] = run_case(source, steps, calibration, feed, out_dir, _slug(key))
            print(f"{key}: {results[key].get('error') or results[key]['seconds']}", flush=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = Path(args.compare)
        old = json.loads(before.read_text())
        old = {k: v for k, v in old.items() if k in results}
        sys.exit(1 if compare(old, results, before.with_suffix(".outputs"), out_dir) else 0)


def _slug(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:16]


if __name__ == "__main__":
    main()
