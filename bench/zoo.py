"""Model zoo: every pass on torchvision's classification, segmentation and video architectures,
exported with random weights. Each run must end in a valid, runnable model or in layers
declined with reasons; exit 3 (a bug), a timeout or an invalid output is a finding.

    pip install -e ".[zoo]"
    python bench/zoo.py [--quick] [--models resnet18,r3d_18] [--settings qdq,int4] [--timeout 180]

Exports (opset 17, dynamic batch, TorchScript exporter) are cached in $ONNXCOMPRESS_ZOO_CACHE
or /tmp/onnxcompress-zoo/ and re-used; results.json is written there too. Each setting runs
the CLI in a subprocess (``--samples 2``). A cell reads
``ok <file ratio>x, <layers rewritten>/<skipped>, e=<rel L2 of the first output>``,
``exit N: <last stderr line>``, ``invalid: <checker error>`` or ``timeout``. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("ONNXCOMPRESS_ZOO_CACHE", "/tmp/onnxcompress-zoo"))

CLS = (1, 3, 224, 224)
CLS_SMALL = (1, 3, 128, 128)
SEG = (1, 3, 128, 128)
VIDEO = (1, 3, 8, 112, 112)
VIDEO_S3D = (1, 3, 16, 224, 224)  # its last pooling kernel needs 16 frames of 224

#: name -> (torchvision sub-module, input shape). Models with fixed-size position embeddings or
#: windows get 224; the rest the smaller 128 input.
MODELS = {
    "resnet18": ("models", CLS_SMALL),
    "mobilenet_v3_small": ("models", CLS_SMALL),
    "efficientnet_b0": ("models", CLS_SMALL),
    "shufflenet_v2_x0_5": ("models", CLS_SMALL),
    "squeezenet1_0": ("models", CLS_SMALL),
    "densenet121": ("models", CLS_SMALL),
    "regnet_y_400mf": ("models", CLS_SMALL),
    "mnasnet0_5": ("models", CLS_SMALL),
    "googlenet": ("models", CLS_SMALL),
    "convnext_tiny": ("models", CLS_SMALL),
    "swin_t": ("models", CLS),
    "lraspp_mobilenet_v3_large": ("models.segmentation", SEG),
    "deeplabv3_mobilenet_v3_large": ("models.segmentation", SEG),
    "r3d_18": ("models.video", VIDEO),
    # large or slow: last, so a time-boxed run covers the rest first
    "s3d": ("models.video", VIDEO_S3D),
    "fcn_resnet50": ("models.segmentation", SEG),
    "vit_b_16": ("models", CLS),
}
QUICK = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "lraspp_mobilenet_v3_large", "r3d_18"]

SETTINGS = [
    "lowrank:energy=0.9",
    "lowrank:scheme=separable,rank=1",
    "prune:ratio=0.3",
    "sparsity:ratio=0.5",
    "codebook:bits=4",
    "qdq",
    "int4",
]


def export(name: str) -> tuple[Path | None, str]:
    """The cached ONNX export of ``name``, or None and why it failed."""
    path = CACHE / f"{name}.onnx"
    if path.exists():
        return path, "cached"
    import importlib

    import torch

    module, shape = MODELS[name]
    builder = getattr(importlib.import_module(f"torchvision.{module}"), name)
    segmentation = module.endswith("segmentation")
    kwargs = {"weights_backbone": None, "aux_loss": False} if segmentation else {}
    model = builder(weights=None, **kwargs).eval()
    if segmentation:
        model = _out_only(model)
    tmp = path.with_suffix(".tmp.onnx")
    # Grad stays enabled: under no_grad nn.MultiheadAttention (vit) takes its fused fast path,
    # which the TorchScript exporter cannot export.
    try:
        torch.onnx.export(
            model,
            (torch.randn(*shape),),
            str(tmp),
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
    except Exception as error:
        return None, _last_line(f"{type(error).__name__}: {error}")
    tmp.replace(path)
    return path, "exported"


def _out_only(model):
    """Segmentation models return a dict; export only its ``out`` tensor (torch imported late)."""
    import torch

    class OutOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    return OutOnly(model)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_setting(model: Path, setting: str, timeout: float, work: Path) -> dict:
    """Compress ``model`` with one pass setting in a subprocess and check what came back."""
    tag = setting.replace(":", "_").replace(",", "_").replace("=", "")
    out, report = work / f"{model.stem}-{tag}.onnx", work / f"{model.stem}-{tag}.json"
    cmd = [sys.executable, "-m", "onnxcompress", "compress", str(model), "-o", str(out)]
    cmd += ["-p", setting, "--report", str(report), "--samples", "2"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1)}
    result = {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        result["error"] = _last_line(proc.stderr) or _last_line(proc.stdout)
    if report.exists():
        result.update(_from_report(json.loads(report.read_text())))
    if proc.returncode == 0:
        result["invalid"] = check_output(out)
    result["status"] = _status(result)
    for path in (out, report, out.with_suffix(".onnx.data"), out.with_suffix(".data")):
        path.unlink(missing_ok=True)
    return result


def _from_report(report: dict) -> dict:
    totals = report["passes"][0]["totals"] if report.get("passes") else {}
    before, after = report.get("before") or {}, report.get("after") or {}
    outputs = (report.get("validation") or {}).get("outputs") or []
    ratio = None
    if before.get("file_bytes") and after.get("file_bytes"):
        ratio = before["file_bytes"] / after["file_bytes"]
    return {
        "rewritten": totals.get("layers_rewritten"),
        "skipped": totals.get("layers_skipped"),
        "file_ratio": ratio,
        "rel_l2": outputs[0].get("rel_l2") if outputs else None,
    }


def check_output(path: Path) -> str | None:
    """None when the model passes the full checker and loads in onnxruntime, else the error."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        return _last_line(f"{type(error).__name__}: {error}")
    return None


def _status(result: dict) -> str:
    if result["exit"] == 0:
        return "invalid" if result.get("invalid") else "ok"
    return f"exit {result['exit']}"


def cell(result: dict) -> str:
    status = result["status"]
    if status == "ok":
        ratio = result.get("file_ratio")
        size = f"{ratio:.1f}x" if ratio else "-"
        error = result.get("rel_l2")
        fidelity = f", e={error:.2g}" if error is not None else ""
        return f"ok {size}, {result.get('rewritten')}/{result.get('skipped')}{fidelity}"
    if status == "invalid":
        return f"invalid: {result['invalid'][:60]}"
    if status == "timeout":
        return "timeout"
    return f"{status}: {result.get('error', '')[:60]}"


def markdown(results: dict, settings: list[str]) -> list[str]:
    rows = [["model", *settings]]
    for name, entry in results.items():
        if "export_error" in entry:
            rows.append(
                [name, f"export failed: {entry['export_error'][:60]}"] + [""] * (len(settings) - 1)
            )
        else:
            rows.append([name, *(cell(entry["runs"][s]) for s in settings)])
    escape = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(escape[0]) + " |", "|" + "---|" * len(settings) + "---|"]
    return lines + ["| " + " | ".join(row) + " |" for row in escape[1:]]


def summary(results: dict) -> str:
    counts: dict[str, int] = {}
    for entry in results.values():
        for result in entry.get("runs", {}).values():
            counts[result["status"]] = counts.get(result["status"], 0) + 1
    failed = sum("export_error" in e for e in results.values())
    order = ["ok", "exit 1", "exit 2", "exit 3", "invalid", "timeout"]
    keys = order + sorted(set(counts) - set(order))
    return ", ".join(f"{k}: {counts.get(k, 0)}" for k in keys) + f"; export failed: {failed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="Comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="Only " + ",".join(QUICK))
    parser.add_argument("--settings", help="Comma-separated pass names to keep (e.g. qdq,int4)")
    parser.add_argument("--timeout", type=float, default=180.0, help="Seconds per run")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else QUICK if args.quick else list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    settings = SETTINGS
    if args.settings:
        keep = set(args.settings.split(","))
        settings = [s for s in SETTINGS if s.split(":")[0] in keep or s in keep]
    CACHE.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="zoo-", dir=CACHE) as work:
        for name in names:
            results[name] = bench_model(name, settings, args.timeout, Path(work))
            (CACHE / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(markdown(results, settings)))
    print(summary(results))
    print(f"results: {CACHE / 'results.json'}")


def bench_model(name: str, settings: list[str], timeout: float, work: Path) -> dict:
    start = time.perf_counter()
    path, how = export(name)
    print(f"{name}: {how} in {time.perf_counter() - start:.1f}s", flush=True)
    if path is None:
        return {"export_error": how}
    runs = {}
    for setting in settings:
        runs[setting] = run_setting(path, setting, timeout, work)
        print(f"  {setting:34s} {cell(runs[setting])} ({runs[setting]['seconds']}s)", flush=True)
    return {"runs": runs}


if __name__ == "__main__":
    main()
