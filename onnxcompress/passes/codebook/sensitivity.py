"""How much of a weight's error reaches the model's outputs, measured once per weight.

The relative error a codebook causes in one layer's output reaches the model's outputs
scaled by a factor that differs by orders of magnitude from layer to layer: on
EfficientNet-Lite1 a 3×3 depthwise conv passes on 2-5% of it, the 1×1 projection that starts
a residual stream 3-10 times it. So each weight is probed once (a 3-bit per-channel codebook)
and the model's output error is measured with that weight alone changed; the ratio of the
two errors is the weight's *gain*, and a choice's predicted output error is its layer error
times the gain. All probes run in one onnxruntime session, the weights fed as inputs that
override their initializers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.runner import Runner

#: Samples the probes run on (the first calibration feeds that hold this many): as many as
#: fit ``PROBE_MACS`` multiply-adds a probe (4 on EfficientNet-Lite1, where 4 measured the
#: same as 8 for 6 s less), within these bounds.
PROBE_MACS = 2_400_000_000
PROBE_SAMPLES = (4, 64)
PROBE_BITS = 3

#: A weight's probe: the values to feed in place of initializers (the approximated weight,
#: and its bias corrected for the mean shift when there is data), and the layer error.
Probe = Callable[[ir.Value], tuple[dict[str, np.ndarray], float]]


def output_gains(
    model: ir.Model,
    weights: Sequence[ir.Value],
    probe: Probe,
    feeds: Sequence[Feed],
    also: Sequence[ir.Value] = (),
    samples: int = PROBE_SAMPLES[0],
) -> dict[str, float]:
    """Per weight name: the model's output error (relative squared L2, summed over the
    outputs) with that weight alone replaced by its probe, over the probe's layer error.
    ``also``: other initializers a probe may replace (biases)."""
    fixed = any(
        value.shape is None or not value.shape or isinstance(value.shape[0], int)
        for value in model.graph.inputs
    )
    chosen = _probe_feeds(feeds, samples, cut=not fixed)
    fed = list({id(v): v for v in [*weights, *also]}.values())
    with _overridable(model, fed), Runner(model, "model for codebook sensitivity") as runner:
        references = [runner.run(feed) for feed in chosen]
        gains = {}
        for value in weights:
            replaced, layer_error = probe(value)
            if layer_error <= 0:
                gains[value.name] = 0.0
                continue
            error = _output_error(runner, chosen, references, replaced)
            gains[value.name] = error / layer_error
    return gains


def probe_samples(macs_per_sample: float) -> int:
    """How many samples the probes run on, for a model of this many multiply-adds a sample."""
    low, high = PROBE_SAMPLES
    return int(min(high, max(low, PROBE_MACS // max(macs_per_sample, 1))))


def _probe_feeds(feeds: Sequence[Feed], wanted: int, cut: bool) -> list[Feed]:
    """The first ``wanted`` samples of the feeds (a batch ``cut`` when its inputs share their
    leading axis and the model leaves it open)."""
    chosen, samples = [], 0
    for feed in feeds:
        lengths = {len(a) if np.ndim(a) else None for a in feed.values()}
        length = lengths.pop() if len(lengths) == 1 else None
        if cut and length is not None and samples + length > wanted:
            length = wanted - samples
            feed = {name: array[:length] for name, array in feed.items()}
        chosen.append(feed)
        samples += length or 1
        if samples >= wanted:
            break
    return chosen


def _output_error(
    runner: Runner,
    feeds: list[Feed],
    references: list[list[np.ndarray]],
    replaced: dict[str, np.ndarray],
) -> float:
    noise = np.zeros(len(references[0]))
    signal = np.zeros(len(references[0]))
    for feed, reference in zip(feeds, references):
        outputs = runner.run({**feed, **replaced})
        for i, (got, want) in enumerate(zip(outputs, reference)):
            want = np.asarray(want, np.float64)
            noise[i] += float(np.square(np.asarray(got, np.float64) - want).sum())
            signal[i] += float(np.square(want).sum())
    return float(sum(n / s for n, s in zip(noise, signal) if s > 0))


@contextmanager
def _overridable(model: ir.Model, weights: Sequence[ir.Value]):
    """The weights listed as graph inputs too, while the block runs: onnxruntime then takes
    a fed value in place of the initializer."""
    graph = model.graph
    count = len(graph.inputs)
    typed = [(value, value.shape, value.type) for value in weights if not value.is_graph_input()]
    for value, _, _ in typed:
        value.shape = value.shape or ir.Shape(value.const_value.shape)
        value.dtype = value.dtype or value.const_value.dtype
        graph.inputs.append(value)
    try:
        yield
    finally:
        while len(graph.inputs) > count:
            graph.inputs.pop()
        for value, shape, type_ in typed:
            value.shape, value.type = shape, type_  # as they were: no value_info on save
