"""Closed-form repair of linear layers: refit Conv/Gemm/MatMul weights by least squares so the
layer's output on calibration data matches a teacher's (ThiNet; He et al. 2017).

For each target layer, ``X`` are the layer's inputs in the model being repaired and ``Y`` the
same layer's outputs in the teacher. Running sums ``G = XᵀX``, ``H = XᵀY`` and ``Σ|Y|²`` are kept
a batch at a time (rows subsampled for convolutions), then the ridge problem
``min ||XW - Y||² + λ||W - W0||²`` is solved, pulling towards the current weights ``W0`` where the
data says little. A sparsity mask, when given, restricts each output column to its support.

Targets are refitted in waves: a target whose input depends on another target's output waits
until that one is refitted, so each layer is fitted on inputs that already include upstream
repairs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.conv import ConvGeometry, channels_last, im2col, sample_rows
from onnxcompress.emit import Namer, add_weight
from onnxcompress.graph import node_label
from onnxcompress.validate import Runner

logger = logging.getLogger(__name__)


#: A masked refit solves one system per output column; past this many inputs it is too slow.
MAX_MASKED_FEATURES = 2048


class NotRefittable(Exception):
    """This layer's form is outside what the closed-form refit handles."""


@dataclass
class Target:
    """A layer to refit; ``out_keep`` selects the teacher's output channels it must match."""

    node: ir.Node
    out_keep: np.ndarray | None = None
    mask: np.ndarray | None = None  # [features, outputs] support of W (sparsity), None = dense
    stats: dict = field(default_factory=dict)


@dataclass
class RefitResult:
    node: str
    error_before: float | None = None  # relative output error on calibration data
    error_after: float | None = None
    skipped: str | None = None


def refit(
    model: ir.Model,
    targets: Sequence[Target],
    teacher: Runner,
    feeds: Sequence[Feed],
    damping: float = 1e-3,
    max_rows: int = 4096,
    seed: int = 0,
) -> list[RefitResult]:
    """Refit ``targets`` in place, wave by wave; ``teacher`` must expose their output names."""
    rng = np.random.default_rng(seed)
    results: list[RefitResult] = []
    pending = []
    for target in targets:
        try:
            _check(target.node)
            pending.append(target)
        except NotRefittable as why:
            results.append(RefitResult(node_label(target.node), skipped=str(why)))
    namer = Namer(model)
    for wave in _waves(model.graph, pending):
        _collect(model, wave, teacher, feeds, max_rows, rng)
        results.extend(_solve_and_store(target, damping, namer) for target in wave)
    return results


def _check(node: ir.Node) -> None:
    if node.op_type == "Conv":
        weight = node.inputs[1].const_value
        if weight is None or len(weight.shape) < 3:
            raise NotRefittable("conv weight is not a constant")
        if node.attributes.get_int("group", 1) != 1:
            raise NotRefittable("grouped convolution")
    elif node.op_type in ("Gemm", "MatMul"):
        if node.inputs[1].const_value is None or len(node.inputs[1].const_value.shape) != 2:
            raise NotRefittable("weight is not a 2-D constant")
    else:
        raise NotRefittable(f"{node.op_type} is not refitted")


def _waves(graph: ir.Graph, targets: list[Target]) -> list[list[Target]]:
    """Group targets so that none depends on another target of its own wave or a later one."""
    by_node = {id(t.node): t for t in targets}
    depth: dict[ir.Value, int] = {}
    waves: dict[int, list[Target]] = {}
    for node in graph:
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if id(node) in by_node:
            waves.setdefault(level, []).append(by_node[id(node)])
            level += 1
        for output in node.outputs:
            depth[output] = level
    return [waves[k] for k in sorted(waves)]


def _collect(model, wave: list[Target], teacher: Runner, feeds, max_rows: int, rng) -> None:
    inputs = [t.node.inputs[0].name for t in wave]
    student = Runner(model, "model being repaired", extra_outputs=inputs)
    try:
        for feed in feeds:
            xs = student.capture(feed, inputs)
            ys = teacher.capture(feed, [t.node.outputs[0].name for t in wave])
            for target in wave:
                x = xs[target.node.inputs[0].name]
                y = ys[target.node.outputs[0].name]
                _accumulate(target, x, y, max_rows, rng)
    finally:
        student.close()


def _accumulate(target: Target, x: np.ndarray, y: np.ndarray, max_rows: int, rng) -> None:
    node = target.node
    if node.op_type == "Conv":
        rows, outputs = _conv_rows(node, x, y, max_rows, rng)
    else:
        rows, outputs = _dense_rows(node, x, y, max_rows, rng)
    if target.out_keep is not None:
        outputs = outputs[:, target.out_keep]
    if _has_intercept(node):
        rows = np.concatenate([rows, np.ones((len(rows), 1), rows.dtype)], axis=1)
    # products of one batch in float32 (the costly part), sums over batches in float64
    rows, outputs = rows.astype(np.float32), outputs.astype(np.float32)
    stats = target.stats
    stats["G"] = stats.get("G", 0) + (rows.T @ rows).astype(np.float64)
    stats["H"] = stats.get("H", 0) + (rows.T @ outputs).astype(np.float64)
    stats["YY"] = stats.get("YY", 0) + float(np.square(outputs, dtype=np.float64).sum())


def _conv_rows(node: ir.Node, x: np.ndarray, y: np.ndarray, max_rows: int, rng):
    """im2col rows ``[r, C·prod(k)]`` at sampled output positions, and the teacher's ``[r, O]``."""
    geometry = ConvGeometry.of(node, tuple(node.inputs[1].const_value.shape[2:]))
    positions = y.size // y.shape[1]
    picks = sample_rows(positions, max_rows, rng)
    if picks is None:
        picks = np.arange(positions)
    return im2col(x, geometry, picks), channels_last(y, picks)


def _dense_rows(node: ir.Node, x: np.ndarray, y: np.ndarray, max_rows: int, rng):
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        x = x.T
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    picks = _sample(len(x), max_rows, rng)
    return x[picks], y[picks]


def _sample(count: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    picks = sample_rows(count, limit, rng)
    return np.arange(count) if picks is None else picks


def _has_intercept(node: ir.Node) -> bool:
    if node.op_type == "Conv":
        return True
    if node.op_type != "Gemm" or node.attributes.get_float("beta", 1.0) == 0:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return True
    out = node.inputs[1].const_value.shape[0 if node.attributes.get_int("transB", 0) else 1]
    return (
        bias.const_value is not None and bias.const_value.size in (1, out) and len(bias.uses()) == 1
    )


def _current(node: ir.Node, features: int) -> np.ndarray:
    """The layer's weights as the ``[features(+1), outputs]`` matrix the rows multiply."""
    weight = np.asarray(node.inputs[1].const_value.numpy(), dtype=np.float64)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type == "Conv":
        matrix = weight.reshape(weight.shape[0], -1).T
    elif node.op_type == "Gemm":
        trans_b = node.attributes.get_int("transB", 0)
        matrix = (weight.T if trans_b else weight) * node.attributes.get_float("alpha", 1.0)
    else:
        matrix = weight
    if features == matrix.shape[0] + 1:  # the intercept row
        scale = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
        values = np.zeros(matrix.shape[1])
        if bias is not None and bias.const_value is not None:
            values = values + np.asarray(bias.const_value.numpy(), np.float64).reshape(-1) * scale
        matrix = np.vstack([matrix, values])
    return matrix


def _solve_and_store(target: Target, damping: float, namer: Namer) -> RefitResult:
    stats, node = target.stats, target.node
    label = node_label(node)
    if "G" not in stats:
        return RefitResult(label, skipped="no calibration data")
    gram, cross = stats["G"], stats["H"]
    current = _current(node, gram.shape[0])
    if current.shape != cross.shape:
        return RefitResult(label, skipped=f"shape mismatch {current.shape} vs {cross.shape}")
    if target.mask is not None and len(gram) > MAX_MASKED_FEATURES:
        return RefitResult(label, skipped=f"{len(gram)} inputs: too many for a masked refit")
    ridge = damping * max(float(np.trace(gram)) / len(gram), 1e-12)
    if target.mask is None:
        system = gram + ridge * np.eye(len(gram))
        solved = _solve(system, cross + ridge * current)
    else:
        solved = _masked_solve(gram, cross, current, target.mask, ridge)
    before = _relative_error(stats, current)
    after = _relative_error(stats, solved)
    if after >= before:  # never make a layer worse on the data it was fitted to
        return RefitResult(label, before, before)
    _store(node, solved, namer)
    return RefitResult(label, before, after)


def _masked_solve(gram, cross, current, mask: np.ndarray, ridge: float) -> np.ndarray:
    solved = np.zeros_like(current)
    support_all = np.ones((len(gram), mask.shape[1]), dtype=bool)
    support_all[: mask.shape[0]] = mask
    for column in range(current.shape[1]):
        support = np.flatnonzero(support_all[:, column])
        sub = gram[np.ix_(support, support)] + ridge * np.eye(len(support))
        rhs = cross[support, column] + ridge * current[support, column]
        solved[support, column] = _solve(sub, rhs)
    return solved


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the (ridge-regularized, symmetric) system; least squares if it is singular."""
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(system, rhs, rcond=None)[0]


def _relative_error(stats: dict, matrix: np.ndarray) -> float:
    """||XW - Y|| / ||Y|| from the running sums, without the samples."""
    residual = (
        float(np.sum(matrix * (stats["G"] @ matrix)))
        - 2 * float(np.sum(matrix * stats["H"]))
        + stats["YY"]
    )
    return float(np.sqrt(max(residual, 0.0) / max(stats["YY"], 1e-30)))


def _store(node: ir.Node, matrix: np.ndarray, namer: Namer) -> None:
    weight = node.inputs[1]
    stored = weight.const_value
    dtype = stored.dtype.numpy()
    features = int(np.prod(stored.shape)) // (
        stored.shape[0]
        if node.op_type == "Conv"
        else stored.shape[
            0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
        ]
    )
    weights, intercept = matrix[:features], matrix[features:]
    if node.op_type == "Conv":
        new = weights.T.reshape(stored.shape)
    elif node.op_type == "Gemm":
        new = weights / node.attributes.get_float("alpha", 1.0)
        new = new.T if node.attributes.get_int("transB", 0) else new
    else:
        new = weights
    _set(weight, new.astype(dtype))
    if len(intercept):
        _store_bias(node, intercept[0], dtype, namer)


def _store_bias(node: ir.Node, values: np.ndarray, dtype, namer: Namer) -> None:
    scale = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
    values = (values / scale).astype(dtype)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        bias = add_weight(node.graph, namer, f"{node.inputs[1].name}.bias", values)
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        return
    _set(
        bias,
        values.reshape(bias.const_value.shape) if bias.const_value.size == len(values) else values,
    )


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
