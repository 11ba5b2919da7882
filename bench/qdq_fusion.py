"""Which quantized kernels onnxruntime runs after optimizing the qdq pass's output.

    python bench/qdq_fusion.py

For mnist-8, the trained CNN fixture, ultraface and ppocr_mobile_v2_cls: the fused op counts
in the graph onnxruntime writes (ORT_ENABLE_EXTENDED), and how many float Conv/Gemm/MatMul
remain.
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.mnist import default_real_dir, mnist_split  # noqa: E402
from fixtures.photos import cls_inputs, ultraface_inputs  # noqa: E402
from onnxcompress import Options, compress  # noqa: E402

FUSED = ("QLinear", "QGemm", "MatMulInteger", "DynamicQuantize")


def cases(real: Path) -> dict[str, tuple[Path, list[dict]]]:
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        digits = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 1, 1, 28, 28)
    (train_x, _), _ = mnist_split()
    lines = cls_inputs(20)
    return {
        "mnist-8": (
            real / "mnist-8.onnx",
            [{"Input3": d.astype(np.float32)} for d in digits[::100]],
        ),
        "mnist_cnn": (
            REPO / "fixtures" / "mnist_cnn.onnx",
            [{"input": train_x[i : i + 10]} for i in range(0, 100, 10)],
        ),
        "ultraface": (real / "ultraface_rfb320.onnx", [{"input": a} for a in ultraface_inputs(10)]),
        "ppocr_cls": (real / "ppocr_mobile_v2_cls.onnx", [{"x": lines[:10]}, {"x": lines[10:]}]),
    }


def optimized_ops(model: ir.Model, folder: Path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    proto = ir.to_proto(model).SerializeToString()
    ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name, (path, feeds) in cases(default_real_dir()).items():
            model, _ = compress(str(path), ["qdq"], feeds, options=Options(validate=False))
            ops = optimized_ops(model, Path(folder))
            fused = {op: n for op, n in sorted(ops.items()) if op.startswith(FUSED)}
            left = ops["Conv"] + ops["ConvTranspose"] + ops["Gemm"] + ops["MatMul"]
            print(f"{name}: {fused}; float Conv/Gemm/MatMul left: {left}")


if __name__ == "__main__":
    main()
