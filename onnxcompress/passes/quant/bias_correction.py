"""Bias correction (Nagel et al. 2019, the empirical form): rounding a weight shifts the mean of
the layer's output by (W_q − W)·E[x], with E[x] per input channel from calibration; subtracting
that shift from the bias takes the systematic part of the rounding error out."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.stats import output_shift


def correct_bias(
    emitter: Emitter,
    node: ir.Node,
    weight: np.ndarray,
    restored: np.ndarray,
    input_mean: np.ndarray | None,
) -> str:
    """Subtract E[(restored − weight)·x] from ``node``'s bias (a private bias changes in
    place; a Conv/Gemm without one gets ``<weight>_bias_corrected``). Returns what was done
    or why not, for the layer's report."""
    if node.op_type not in ("Conv", "Gemm"):
        return f"skipped: {node.op_type} has no bias to correct"
    if input_mean is None:
        return "skipped: no input statistics"
    if node.op_type == "Gemm" and _scaled(node):
        return "skipped: unsupported layout"
    shift = output_shift(node, restored - weight, input_mean.astype(np.float64))
    if shift is None:
        return "skipped: unsupported layout"
    problem = emitter.shift_bias(node, -shift, f"{node.inputs[1].name}_bias_corrected")
    if problem is not None:
        return f"skipped: {problem}"
    return f"max shift {float(np.abs(shift).max(initial=0)):.3g}"


def _scaled(gemm: ir.Node) -> bool:
    """A Gemm with alpha or beta other than 1: left alone, as its int32 bias would be."""
    attrs = gemm.attributes
    return attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0
