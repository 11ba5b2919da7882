"""Calibration statistics that the data-aware passes share.

A pass sees a Conv/Gemm/MatMul as ``y = W·x + b`` over *rows*: for a Conv a row is an im2col
patch, for Gemm/MatMul a row of the left operand. What the passes need from calibration data
reduces to a few running sums, kept a batch at a time so memory does not grow with the number
of samples:

- ``captured`` / ``captured_pairs``: the values a pass asks for on each feed, from the model
  being compressed (the *student*) and, for fitting, from the original (the *teacher*);
  ``captured_parts`` the same a sample at a time, for statistics over many values (a batch
  of every activation of a CNN would take a gigabyte).
- ``layer_rows``: matching input and output rows of one layer, a seeded sample per batch.
- ``SecondMoments``: Σ x̃x̃ᵀ, Σ x̃yᵀ and Σ|y|² with x̃ = [x, 1], from which least-squares fits
  and output errors follow without the samples.
- ``ChannelMean``: per-channel means of an activation.
- ``output_shift``: E[(W' − W)·x], the mean output change of a new weight (bias correction).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.conv import ConvGeometry, channels_last, im2col, sample_rows
from onnxcompress.runner import Runner


def captured(
    model: ir.Model, names: Sequence[str], feeds: Sequence[Feed], label: str = "model"
) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the named values of ``model``, whole (one onnxruntime session for the sweep).
    A name that is a graph input is taken from the feed itself. For a few values per feed, as
    fits that sample rows of a batch need; statistics over many values use ``captured_parts``."""
    with _capture_runner(model, names, label) as runner:
        for feed in feeds:
            yield runner.capture(feed, names)


def captured_parts(
    model: ir.Model, names: Sequence[str], feeds: Sequence[Feed], label: str = "model"
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(feed index, the named values on a part of that feed), part by part: what ``captured``
    gives, one sample at a time (``Runner.capture_parts``), so that no more than a sample's
    values are held at once, however many are named. For statistics that fold each part as
    it comes: a part's dict is emptied when the next is asked for, so that its arrays (the
    memory the next run needs) go unless kept."""
    with _capture_runner(model, names, label) as runner:
        parts = (
            (index, values)
            for index, feed in enumerate(feeds)
            for values in runner.capture_parts(feed, names)
        )
        for index, values in _one_ahead(parts):
            yield index, values
            values.clear()


_END = object()


def _one_ahead(items: Iterator) -> Iterator:
    """``items``, the next one made in a thread while the caller works on the current one:
    onnxruntime runs release the GIL, so a sweep's runs and the statistics folded from them
    overlap (one item more is held). A failure in the thread is raised here; when the caller
    stops early, the thread stops after the item it is making."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((_END, None))
        except BaseException as exc:  # raised again in the caller's thread
            hand_over((None, exc))

    thread = threading.Thread(target=make, name="onnxcompress-capture", daemon=True)
    thread.start()
    try:
        while True:
            item, failure = slot.get()
            if failure is not None:
                raise failure
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _capture_runner(model: ir.Model, names: Sequence[str], label: str) -> Runner:
    inputs = {value.name for value in model.graph.inputs}
    computed = [name for name in dict.fromkeys(names) if name not in inputs]
    return Runner(model, label, extra_outputs=computed)


def captured_pairs(
    student: ir.Model,
    inputs: Sequence[str],
    teacher: Runner,
    outputs: Sequence[str],
    feeds: Sequence[Feed],
    label: str = "model being compressed",
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per feed, the student's ``inputs`` and the teacher's ``outputs`` (the teacher session
    must expose them): what a layer receives now against what it should produce."""
    for xs, feed in zip(captured(student, inputs, feeds, label), feeds):
        yield xs, teacher.capture(feed, list(outputs))


def layer_rows(
    node: ir.Node, x: np.ndarray, y: np.ndarray, max_rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Matching rows of a Conv/Gemm/MatMul's input ``x`` and output ``y`` ([rows, D] and
    [rows, O]), at most ``max_rows`` of them, sampled with ``rng``."""
    if node.op_type == "Conv":
        kernel = tuple(node.inputs[1].const_value.shape[2:])
        keep = sample_rows(y.size // y.shape[1], max_rows, rng)
        return im2col(x, ConvGeometry.of(node, kernel), keep), channels_last(y, keep)
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        x = x.T
    x_rows = x.reshape(-1, x.shape[-1])
    y_rows = y.reshape(-1, y.shape[-1])
    keep = sample_rows(len(x_rows), max_rows, rng)
    return (x_rows, y_rows) if keep is None else (x_rows[keep], y_rows[keep])


@dataclass
class SecondMoments:
    """Running sums over calibration rows of a layer input x̃ (x, with a trailing 1 when
    ``intercept``) and a target output y: Σ x̃x̃ᵀ [D', D'], Σ x̃yᵀ [D', O] and Σ|y|².

    ``product_dtype`` is the precision of each batch's products (float32 halves the cost on
    wide layers); the sums over batches are always float64."""

    intercept: bool = True
    product_dtype: type = np.float64
    xx: np.ndarray | None = None
    xy: np.ndarray | None = None
    yy: float = 0.0
    count: int = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Add matching rows of x and y; without ``y`` only Σ x̃x̃ᵀ grows (a Gram matrix of
        the inputs: ``xy``, ``yy`` and ``error`` are then left unset)."""
        x = x.astype(self.product_dtype, copy=False)
        # the intercept's row and column are sums: no copy of x with a column of ones
        xx = _bordered(x.T @ x, x.sum(0, dtype=np.float64), len(x), self.intercept)
        self.xx = xx if self.xx is None else self.xx + xx
        self.count += len(x)
        if y is None:
            return
        y = y.astype(self.product_dtype, copy=False)
        xy = (x.T @ y).astype(np.float64)
        if self.intercept:
            xy = np.concatenate([xy, y.sum(0, dtype=np.float64)[None]])
        self.xy = xy if self.xy is None else self.xy + xy
        self.yy += float(np.square(y, dtype=np.float64).sum())

    @property
    def inputs(self) -> int:
        """D: input features, without the intercept."""
        return len(self.xx) - self.intercept

    def mean_input(self) -> np.ndarray:
        """E[x] over the rows (needs the intercept column)."""
        return self.xx[: self.inputs, self.inputs] / max(self.count, 1)

    def error(self, affine: np.ndarray) -> float:
        """Relative output error |y − Aᵀx̃| / |y| of the map ``affine`` [D', O] on the rows."""
        residual = float(np.sum(affine * (self.xx @ affine))) - 2 * float(np.sum(affine * self.xy))
        residual += self.yy
        return float(np.sqrt(max(residual, 0.0) / self.yy)) if self.yy > 0 else 0.0


def _bordered(gram: np.ndarray, sums: np.ndarray, count: int, intercept: bool) -> np.ndarray:
    """x̃ᵀx̃ in float64 from xᵀx, Σx and the row count (x̃ = [x, 1]); xᵀx alone without the
    intercept."""
    if not intercept:
        return gram.astype(np.float64)
    inputs = len(gram)
    bordered = np.empty((inputs + 1, inputs + 1))
    bordered[:inputs, :inputs] = gram
    bordered[:inputs, inputs] = bordered[inputs, :inputs] = sums
    bordered[inputs, inputs] = count
    return bordered


class ChannelMean:
    """Running per-channel mean of an activation whose channels lie on ``axis`` (of its
    squares, with ``squares``)."""

    def __init__(self, axis: int, squares: bool = False) -> None:
        self.axis, self.squares = axis, squares
        self.total: np.ndarray | None = None
        self.count = 0

    def add(self, array: np.ndarray) -> None:
        axis = self.axis % array.ndim
        channels = array.shape[axis]
        outer = int(np.prod(array.shape[:axis], dtype=np.int64))
        # [outer, C, inner] is a view of a contiguous activation: each sample's channels are
        # summed along contiguous memory, with no channel-last copy and no squared copy
        blocks = array.reshape(outer, channels, -1)
        if blocks.shape[2] == 1:  # channels last (rows of a Gemm): sum over the rows
            flat = blocks[:, :, 0]
            total = (
                np.einsum("nc,nc->c", flat, flat, dtype=np.float64)
                if self.squares
                else flat.sum(axis=0, dtype=np.float64)
            )
        else:
            total = sum(self._per_channel(block) for block in blocks)
        self.total = total if self.total is None else self.total + total
        self.count += array.size // max(channels, 1)

    def _per_channel(self, block: np.ndarray) -> np.ndarray:
        """Σ x (or Σ x²) of each channel's row of one sample ``[C, inner]``; squares in the
        activation's precision, summed in float64 across samples."""
        if self.squares:
            return np.einsum("ci,ci->c", block, block).astype(np.float64)
        return block.sum(axis=1, dtype=np.float64)

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.total is None else self.total / max(self.count, 1)


def output_shift(
    node: ir.Node, delta: np.ndarray, mean: np.ndarray, tap_weights: np.ndarray | None = None
) -> np.ndarray | None:
    """E[(W' − W)·x] per output channel of a Conv/Gemm/MatMul whose weight changes by
    ``delta`` (laid out as stored), from the per-channel input mean; None when the layout is
    not one this understands. ``tap_weights`` weighs a conv's kernel taps (the share of
    positions where each reads inside a padded input). Gemm's alpha is included; beta is the
    bias writer's business."""
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        out_channels, per_group = delta.shape[0], delta.shape[1]
        if mean.size != groups * per_group:
            return None
        weighted = delta if tap_weights is None else delta * tap_weights
        summed = weighted.reshape(out_channels, per_group, -1).sum(-1)  # [O, C/g]
        group_of = np.arange(out_channels) // (out_channels // groups)
        return np.einsum("oc,oc->o", summed, mean.reshape(groups, per_group)[group_of])
    if node.op_type == "Gemm":
        matrix = delta.T if node.attributes.get_int("transB", 0) else delta
        alpha = node.attributes.get_float("alpha", 1.0)
        return alpha * (mean @ matrix) if mean.size == matrix.shape[0] else None
    if node.op_type == "MatMul" and delta.ndim == 2:
        return mean @ delta if mean.size == delta.shape[0] else None
    return None
