"""The per-layer plan of the codebook pass (``granularity=auto``): every weight's choices
measured (``allocate.py``), weighed by each weight's gain to the outputs on the user's data
(``sensitivity.py``), and the budget (an average bit width or a file size) spent where it
removes the most output error."""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import CannotRun
from onnxcompress.graph import output_bias, stripped_proto, weight_array
from onnxcompress.passes.base import PassContext, PassReport
from onnxcompress.passes.codebook.allocate import (
    Choice,
    LayerChoices,
    allocate,
    decoder_overhead,
    measure_choices,
    measure_sparse_choices,
    target_bytes,
    weighted_error,
)
from onnxcompress.passes.codebook.data_aware import InputStats, input_power
from onnxcompress.passes.codebook.fit import quantized_rows
from onnxcompress.passes.codebook.layout import ChannelLayout, channel_axis
from onnxcompress.passes.codebook.sensitivity import PROBE_BITS, output_gains
from onnxcompress.passes.codebook.sparse import MIN_ZERO_SHARE, zero_share
from onnxcompress.probes import macs_per_sample, probe_samples
from onnxcompress.progress import Steps
from onnxcompress.stats import output_shift


@dataclasses.dataclass(frozen=True)
class Goal:
    """An average of ``bits`` per weight, codebooks included, or a file ``size``."""

    bits: float
    size: str | None = None

    def budget(self, model: ir.Model, chosen: list[ir.Value]) -> tuple[float, str]:
        """Bytes the chosen weights may take, and the goal in words."""
        if self.size is None:
            count = sum(value.const_value.size for value in chosen)
            words = f"{self.bits:g} bits per weight on average, codebooks included"
            return count * self.bits / 8, words
        total = _file_bytes(model)
        rest = total - sum(value.const_value.nbytes for value in chosen)
        target = target_bytes(self.size, total)
        # each codebook choice carries its decoder's bytes (``plan_layers``)
        return target - rest, f"size={self.size}: a file of {target:,.0f} bytes"


def _file_bytes(model: ir.Model) -> int:
    """About what the model takes as one file: its graph, small constants and names (what
    does not shrink: 5-10% of a detector's file), and its large weights' data."""
    with stripped_proto(model) as proto:
        skeleton = proto.ByteSize()
        moved = {value.name for value in proto.graph.input}
    weights = (v for v in model.graph.initializers.values() if v.name in moved)
    return skeleton + sum(value.const_value.nbytes for value in weights)


def plan_layers(
    model: ir.Model,
    chosen: list[ir.Value],
    stats: dict[str, InputStats],
    ctx: PassContext,
    report: PassReport,
    goal: Goal,
    codebook_dtype: Callable[[np.dtype], np.dtype],
    storage: str = "auto",
) -> dict[str, Choice]:
    """Bits and granularity of every chosen weight, within the goal's budget: each choice's
    layer error, times the weight's measured gain to the outputs, as low as the bytes allow.
    Mostly-zero weights are weighed as sparse storage unless ``storage`` is dense."""
    probing = bool(ctx.calibration) and not ctx.synthetic_calibration
    label = "codebook: weighing choices" + (", probing gains" if probing else "")
    steps = Steps(ctx.progress, label, len(chosen) * (2 if probing else 1))
    # the probes (onnxruntime runs, which release the GIL) go on in a thread while the
    # choices are weighed (numpy): on 2 cores the two take little more than the longer alone
    with ThreadPoolExecutor(max_workers=1) as pool:
        cancelled = threading.Event()
        pending = pool.submit(_gains, model, chosen, stats, ctx, report, steps, cancelled)
        try:
            layers = []
            for value in chosen:
                layers.append(_weigh(value, stats, goal, codebook_dtype, storage))
                steps.done()
        except BaseException:
            cancelled.set()  # Ctrl-C or a failure: the probes stop at the next weight
            raise
        gains = pending.result()
    for layer in layers:
        layer.gain = gains.get(layer.name, 1.0)
    budget, words = goal.budget(model, chosen)
    plan, fits = allocate(layers, budget)
    for layer in layers:  # the predicted share of the output error, for the report
        choice = plan[layer.name]
        plan[layer.name] = dataclasses.replace(choice, output_error=layer.cost(choice))
    spent = sum(choice.nbytes for choice in plan.values())
    predicted = sum(choice.output_error for choice in plan.values())
    report.notes.append(
        f"codebook: {words}; {spent:,} bytes for {len(plan)} weight(s); predicted output "
        f"error {predicted:.3g} (relative, squared)"
        + (
            ""
            if fits
            else "; the budget cannot be met: the smallest choices taken (weights "
            "under min_size stay float)"
        )
    )
    return plan


def _weigh(value: ir.Value, stats, goal: Goal, codebook_dtype, storage: str) -> LayerChoices:
    """Every choice of one weight, measured."""
    weight, _, rows, power = weighed_rows(value, stats)
    itemsize = codebook_dtype(weight.dtype).itemsize
    # a file-size goal counts each decoder's nodes: a small weight may cost less float
    overhead = decoder_overhead(value.name) if goal.size is not None else 0
    if storage != "dense" and zero_share(rows) >= MIN_ZERO_SHARE:
        always = storage == "sparse"
        return measure_sparse_choices(
            value.name, rows, power, itemsize, weight.nbytes, always, overhead=overhead
        )
    return measure_choices(value.name, rows, power, itemsize, weight.nbytes, overhead=overhead)


def weighed_rows(value: ir.Value, stats: dict[str, InputStats]) -> tuple:
    """The weight, its layout, its rows [C, L] and E[x²] of their inputs (or None)."""
    weight = weight_array(value)
    layout = ChannelLayout(weight.shape, channel_axis(value))
    power = input_power(stats.get(value.name), weight.shape)
    rows = layout.rows(weight.astype(np.float64))
    return weight, layout, rows, None if power is None else layout.rows(power)


def _gains(
    model, chosen, stats, ctx: PassContext, report: PassReport, steps: Steps, cancelled
) -> dict[str, float]:
    """Each weight's gain to the outputs on the user's data; none without: gains measured on
    seeded noise misled more than they told (EfficientNet-Lite1 at 4 bits: agreement with
    float 0.76, against 0.90 with every gain 1). A step of ``steps`` a weight; stops when
    ``cancelled`` is set."""
    if ctx.synthetic_calibration or not ctx.calibration:
        report.notes.append("codebook: no calibration data: layer errors weighed alike")
        return {}
    biases = {v.name: _probe_bias(v, stats) for v in chosen}
    biases = {name: bias for name, bias in biases.items() if bias is not None}
    probe = functools.partial(_probe, stats=stats, biases=biases)
    samples = probe_samples(macs_per_sample(model, ctx.shapes, ctx.calibration))
    try:
        fed = {name: [bias] for name, bias in biases.items()}
        gains = output_gains(
            model, chosen, probe, ctx.calibration, fed, samples, steps.done, cancelled.is_set
        )
    except CannotRun as exc:
        report.notes.append(f"codebook: gains not measured ({exc}): layer errors weighed alike")
        return {}
    report.notes.append(
        "codebook: layer errors weighed by E[x²] of their inputs, scaled by each weight's "
        f"gain to the outputs (measured on {samples} samples)"
    )
    return gains


def _probe(
    value: ir.Value, stats: dict[str, InputStats], biases: dict[str, ir.Value]
) -> tuple[dict[str, np.ndarray], float]:
    """The weight with a 3-bit codebook per channel, as stored, and its bias corrected for
    the mean shift as the rewrite will correct it; and the layer error."""
    weight, layout, rows, power = weighed_rows(value, stats)
    approx = quantized_rows(rows, 1 << PROBE_BITS)
    stored = layout.weight(approx).astype(weight.dtype)
    replaced = {value.name: stored}
    bias = biases.get(value.name)
    if bias is not None:
        layer = stats[value.name]
        shift = output_shift(layer.node, stored.astype(np.float64) - weight, layer.mean)
        beta = output_bias(layer.node)[1]
        if shift is not None and shift.size == bias.const_value.size and beta:
            current = bias.const_value.numpy()
            corrected = current - (shift / beta).reshape(current.shape)
            replaced[bias.name] = corrected.astype(current.dtype)
    return replaced, weighted_error(rows, approx, power)


def _probe_bias(value: ir.Value, stats: dict[str, InputStats]) -> ir.Value | None:
    """The constant bias, read by its layer alone, that bias correction will shift."""
    layer = stats.get(value.name)
    if layer is None:
        return None
    bias, _ = output_bias(layer.node)
    if bias is None or bias.const_value is None or bias.is_graph_input():
        return None
    return bias if len(bias.uses()) == 1 and not bias.is_graph_output() else None
