"""The int4 pass: MatMul/Gemm weights and embedding tables stored as 4-bit integers in blocks
(along a weight's reduction axis, a table's hidden axis), one scale (and, asymmetric, one zero
point) per block.

Each layer gets the form that is not slower than float on a CPU (``form=auto``, the default):
onnxruntime's MatMulNBits where the layer is large enough for it to pay, and elsewhere the
folded form, which onnxruntime decodes to the float weight once, at session creation (4 bits a
weight in the file, float's speed); embedding tables are read by GatherBlockQuantized. The
forms are in ``int4_forms.py``, the packing in ``int4_pack.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress import latency
from onnxcompress.emit import Emitter
from onnxcompress.errors import CannotRun
from onnxcompress.graph import default_opset, is_constant, values_problem, weight_array, weight_axes
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.quant.insert import constant_dq
from onnxcompress.passes.quant.int4_forms import (
    FOLD_OPSET,
    folded_weight,
    gather_node,
    matmulnbits_node,
    nbits_model,
    nbits_pays,
    replace_node,
)
from onnxcompress.passes.quant.int4_pack import Int4Blocks, quantize_blocks
from onnxcompress.progress import Steps
from onnxcompress.timing_cache import TimingCache

#: Blocked DequantizeLinear and int4 types exist from opset 21.
BLOCKED_OPSET = 21
FORMS = ("auto", "matmulnbits", "dq", "folded")
#: What each form is called in the report.
FORM_NAMES = {
    "matmulnbits": "MatMulNBits",
    "dq": "DequantizeLinear",
    "folded": "folded",
    "gather": "GatherBlockQuantized",
}


class Int4(CompressionPass):
    """MatMul/Gemm weights, embedding tables -> int4 blocks (MatMulNBits where it pays)."""

    name = "int4"
    _timings: TimingCache | None = None  # min_speedup's timings, one table a run

    @dataclass(frozen=True)
    class Config:
        block_size: int = 32  # weights per scale along the blocked axis (a power of 2, 16-256)
        symmetric: bool = True  # int4 with no zero point, else uint4 with one per block
        # auto: MatMulNBits where it runs faster than float, else folded; matmulnbits: always
        # (onnxruntime only); dq: blocked DequantizeLinear (standard ONNX, opset 21); folded:
        # 4 bits in the file, decoded to float when the session starts
        form: str = "auto"
        accuracy_level: int = 4  # MatMulNBits: 0 computes in float, 4 on int8 activations
        gather: bool = True  # embedding tables (Gather on a constant float table) too
        min_speedup: float | None = None  # auto: time each layer alone instead of the size rule
        matmulnbits: bool | None = None  # older spelling: true is form=matmulnbits, false dq
        exclude: tuple[str, ...] = ()

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "block_size": (lambda v: v in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256"),
                    "form": (lambda v: v in FORMS, " or ".join(FORMS)),
                    "accuracy_level": (lambda v: v in (0, 1, 2, 3, 4), "0, 1, 2, 3 or 4"),
                    "min_speedup": (lambda v: v > 0, "above 0 (1 keeps MatMulNBits not slower)"),
                },
            )
            if self.matmulnbits is not None:
                legacy = "matmulnbits" if self.matmulnbits else "dq"
                if self.form not in ("auto", legacy):
                    raise ValueError(f"matmulnbits={self.matmulnbits} contradicts form={self.form}")
                object.__setattr__(self, "form", legacy)
            if self.min_speedup is not None and self.form != "auto":
                raise ValueError("min_speedup: only with form=auto")

    def required_opset(self, model: ir.Model) -> int | None:
        needed = {"dq": BLOCKED_OPSET, "folded": FOLD_OPSET, "auto": FOLD_OPSET}.get(
            self.config.form
        )
        if needed is None:
            return None
        opset = default_opset(model) or needed
        return needed if opset < needed else None

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Gather":  # a lookup in a float table, constant or not
            return node.inputs[0] is not None and node.inputs[0].dtype == ir.DataType.FLOAT
        return node.op_type in ("MatMul", "Gemm")

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        emitter = Emitter(model, self.name)
        # min_speedup: layer shapes timed before (this run or an earlier one) are not repeated
        self._timings = TimingCache() if self.config.min_speedup is not None else None
        # timing each layer both ways takes about a second a layer: worth a progress line
        total = sum(self._chosen(node) for node in model.graph)
        steps = Steps(ctx.progress if self._timings else None, "int4: timing layers", total)
        try:
            for node in list(model.graph):
                if not self._chosen(node):
                    continue
                try:
                    if node.op_type == "Gather":
                        layer = self._table(emitter, node)
                    else:
                        layer = self._weight(emitter, node, ctx)
                except Skip as skip:
                    layer = LayerReport.skipped(node, str(skip))
                report.layers.append(layer)
                steps.done()
        finally:
            if self._timings is not None:
                self._timings.finish(report.notes)
        return report

    def _chosen(self, node: ir.Node) -> bool:
        return self.applies(node) and (node.op_type != "Gather" or self.config.gather)

    # -- MatMul / Gemm ---------------------------------------------------------------------

    def _weight(self, emitter: Emitter, node: ir.Node, ctx: PassContext) -> LayerReport:
        cfg = self.config
        weight = _check_weight(node, cfg.exclude)
        array = np.asarray(weight.const_value.numpy(), np.float32)
        axis = weight_axes(node).reduced
        blocks = _quantize(np.moveaxis(array, axis, 0), cfg)
        form, why = self._form(node, blocks, ctx)
        if form == "matmulnbits":
            bias = _nbits_bias(node)
            new, stored = matmulnbits_node(
                emitter, weight.name, node.inputs[0], blocks, bias, cfg.accuracy_level
            )
            replace_node(emitter, node, new)
            before = array.nbytes + (0 if bias is None else bias.nbytes)
        elif form == "dq":
            stored, before = self._blocked_dq(emitter, node, blocks, axis), array.nbytes
        else:
            decoded, stored = folded_weight(emitter, weight, blocks, axis)
            node.replace_input_with(1, decoded)
            before = array.nbytes
        restored = np.moveaxis(blocks.restore(), 0, axis)
        return self._rewritten(node, form, why, blocks, array, restored, (before, stored))

    def _form(self, node: ir.Node, blocks: Int4Blocks, ctx: PassContext) -> tuple[str, str | None]:
        """The form of this layer, and why auto did not pick MatMulNBits (or None)."""
        form = self.config.form
        if form in ("dq", "folded"):
            return form, None
        problem = _nbits_problem(node)
        if form == "matmulnbits":
            if problem:
                raise Skip(problem)
            return form, None
        if problem is None:
            problem = self._slower(node, blocks, ctx)
        return ("folded", problem) if problem else ("matmulnbits", None)

    def _slower(self, node: ir.Node, blocks: Int4Blocks, ctx: PassContext) -> str | None:
        """Why MatMulNBits would not pay here: by the size rule, or with ``min_speedup`` by
        timing the layer alone both ways in onnxruntime on this machine."""
        cfg = self.config
        shape = ctx.shapes.get(node.inputs[0].name)
        known = shape is not None and None not in shape
        k, n = blocks.values.shape
        if cfg.min_speedup is None:
            rows = int(np.prod(shape[:-1])) if known else None
            return nbits_pays(rows, k, n, blocks.block, cfg.accuracy_level)
        if not known:
            return "min_speedup needs the layer's input shape (give --dim or calibration data)"
        opsets = dict(node.graph.opset_imports)
        try:
            before = latency.isolate(node, shape, opsets)
            after = nbits_model(shape, blocks, _nbits_bias(node), cfg.accuracy_level, opsets)
            measured = self._timings.speedup(before, after).speedup
        except CannotRun as exc:
            return f"min_speedup: {exc}"
        if measured < cfg.min_speedup:
            floor = cfg.min_speedup
            return f"MatMulNBits measured {measured:.2f}x float's speed (min_speedup {floor:g})"
        return None

    def _blocked_dq(self, emitter: Emitter, node: ir.Node, blocks: Int4Blocks, axis: int) -> int:
        """Read the weight through a blocked DequantizeLinear; returns its bytes."""
        values = np.moveaxis(blocks.values, 0, axis)
        scales = np.moveaxis(blocks.scales, 0, axis)
        zeros = None if blocks.zeros is None else np.moveaxis(blocks.zeros, 0, axis)
        dq = constant_dq(emitter, node.inputs[1], values, scales, zeros, axis, block=blocks.block)
        node.replace_input_with(1, dq)
        return blocks.nbytes

    # -- embedding tables ------------------------------------------------------------------

    def _table(self, emitter: Emitter, node: ir.Node) -> LayerReport:
        """Gather on a constant float table [V, H] at activation indices: the table in int4
        blocks along H, read by GatherBlockQuantized (or the form asked for)."""
        cfg = self.config
        table = _check_table(node, cfg.exclude)
        array = np.asarray(table.const_value.numpy(), np.float32)
        blocks = _quantize(array.T, cfg)
        if blocks.nbytes >= array.nbytes:
            raise Skip(f"int4 would not save bytes ({blocks.nbytes} >= {array.nbytes})")
        form = "gather" if cfg.form in ("auto", "matmulnbits") else cfg.form
        if form == "gather":
            new, stored = gather_node(emitter, node, blocks)
            replace_node(emitter, node, new)
        elif form == "dq":
            values, scales = blocks.values.T, blocks.scales.T
            zeros = None if blocks.zeros is None else blocks.zeros.T
            dq = constant_dq(emitter, table, values, scales, zeros, 1, block=blocks.block)
            node.replace_input_with(0, dq)
            stored = blocks.nbytes
        else:
            decoded, stored = folded_weight(emitter, table, blocks, 1)
            node.replace_input_with(0, decoded)
        return self._rewritten(
            node, form, None, blocks, array, blocks.restore().T, (array.nbytes, stored)
        )

    def _rewritten(
        self,
        node: ir.Node,
        form: str,
        why: str | None,
        blocks: Int4Blocks,
        array: np.ndarray,
        restored: np.ndarray,
        nbytes: tuple[int, int],
    ) -> LayerReport:
        detail = {"form": FORM_NAMES[form], "block_size": blocks.block}
        detail["symmetric"] = self.config.symmetric
        if form == "matmulnbits":
            detail["accuracy_level"] = self.config.accuracy_level
        if why:
            detail["why"] = why
        return LayerReport.rewritten(
            node,
            detail,
            original=array,
            restored=restored,
            params=(array.size, array.size),
            nbytes=nbytes,
        )


def _quantize(matrix: np.ndarray, cfg: Int4.Config) -> Int4Blocks:
    """``matrix`` [K, N] in int4 blocks along K. A block longer than K holds the same values
    as one just long enough (one block a column), so it is cut to that: less padding."""
    fits = max(16, 1 << (matrix.shape[0] - 1).bit_length())
    return quantize_blocks(matrix, min(cfg.block_size, fits), cfg.symmetric)


def _check_weight(node: ir.Node, exclude: tuple[str, ...]) -> ir.Value:
    """The node's weight, or Skip with why it is not quantized."""
    if name_matches(node, exclude):
        raise Skip("excluded by name pattern")
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_constant(weight):
        raise Skip("weight is not a constant")
    if len(weight.uses()) > 1:
        raise Skip(f"weight is shared by {len(weight.uses())} uses")
    if weight.dtype != ir.DataType.FLOAT or len(weight.shape or ()) != 2:
        raise Skip("weight is not a 2-D float32 matrix")
    problem = values_problem(weight_array(weight))
    if problem:
        raise Skip(problem)
    return weight


def _check_table(node: ir.Node, exclude: tuple[str, ...]) -> ir.Value:
    """The Gather's table, or Skip with why it is not quantized."""
    if name_matches(node, exclude):
        raise Skip("excluded by name pattern")
    table, indices = node.inputs[0], node.inputs[1]
    if not is_constant(table):
        raise Skip("table is not a constant")
    if indices is None or is_constant(indices):
        raise Skip("indices are constant: the rows read are fixed (onnxruntime folds them)")
    if len(table.uses()) > 1:
        raise Skip(f"table is shared by {len(table.uses())} uses")
    if len(table.shape or ()) != 2:
        raise Skip("table is not a 2-D matrix")
    if node.attributes.get_int("axis", 0) not in (0, -2):
        raise Skip("Gather reads along axis 1, not the table's rows")
    problem = values_problem(weight_array(table))
    if problem:
        raise Skip(problem)
    return table


def _nbits_problem(node: ir.Node) -> str | None:
    """Why MatMulNBits cannot compute this node, or None."""
    if node.op_type == "MatMul":
        shape = node.inputs[0].shape
        if shape is not None and len(shape) < 2:
            return "MatMulNBits needs an activation of rank 2 or more"
        return None
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "MatMulNBits cannot transpose the activation (Gemm transA=1)"
    if attrs.get_float("alpha", 1.0) != 1.0:
        return "MatMulNBits has no alpha (Gemm alpha != 1)"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None or attrs.get_float("beta", 1.0) == 0.0:
        return None
    if not is_constant(bias):
        return "Gemm bias is not a constant"
    shape = tuple(bias.const_value.shape)
    if int(np.prod(shape)) not in (1, _outputs(node)) or (len(shape) == 2 and shape[0] != 1):
        return f"Gemm bias of shape {list(shape)} is not one value per output"
    return None


def _outputs(node: ir.Node) -> int:
    """N, the output width of a MatMul/Gemm, from its weight."""
    weight = node.inputs[1].const_value.shape
    return (
        weight[0] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else weight[1]
    )


def _nbits_bias(node: ir.Node) -> np.ndarray | None:
    """The bias MatMulNBits adds (input 5): a Gemm's beta * C, as float32 [N]."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    beta = node.attributes.get_float("beta", 1.0)
    if beta == 0.0:
        return None
    bias = np.asarray(node.inputs[2].const_value.numpy(), np.float32).reshape(-1)
    bias = np.broadcast_to(bias, (_outputs(node),))
    return (bias * np.float32(beta)).astype(np.float32)
