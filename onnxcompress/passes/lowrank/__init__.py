"""Low-rank factorization: truncated SVD, Tucker-2 and depthwise-separable rewrites of
Gemm/MatMul/Conv/ConvTranspose weights, optionally fitted to calibration data.

``lowrank.py`` holds the pass; ``layer.py`` the view of a node as y = M·x + b;
``factorize.py`` the numerics; ``plan.py`` the chosen factors and the graph rewrite;
``targets.py`` the calibration moments per layer; ``fold.py`` the pointwise merge."""

from onnxcompress.passes.lowrank.lowrank import LowRank

__all__ = ["LowRank"]
