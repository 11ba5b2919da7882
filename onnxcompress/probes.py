"""Probes: the model's output error with a few initializers replaced, many replacements in
one onnxruntime session.

Passes that weigh their choices by what reaches the model's outputs (codebook's per-weight
gains, prune's per-group sensitivity) open one session in which the initializers they may
replace are graph inputs too (``overridable``): onnxruntime then takes a fed value in place
of the initializer, so each probe is one run, not one session.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.graph import model_macs
from onnxcompress.runner import Runner

#: Samples the probes run on (the first calibration feeds that hold this many): as many as
#: fit ``PROBE_MACS`` multiply-adds a probe (4 on EfficientNet-Lite1, where 4 measured the
#: same as 8 for 6 s less), within these bounds.
PROBE_MACS = 2_400_000_000
PROBE_SAMPLES = (4, 64)


class ProbeSession:
    """A session on ``model`` whose ``values`` (initializers) may be replaced run by run, with
    the reference outputs on the first ``samples`` samples of ``feeds``."""

    def __init__(
        self,
        model: ir.Model,
        values: Sequence[ir.Value],
        feeds: Sequence[Feed],
        samples: int,
        label: str,
    ) -> None:
        fixed = any(
            value.shape is None or not value.shape or isinstance(value.shape[0], int)
            for value in model.graph.inputs
        )
        self.feeds = probe_feeds(feeds, samples, cut=not fixed)
        if not fixed:  # one sample a run: the session's arena stays that of batch 1
            self.feeds = [one for feed in self.feeds for one in _samples_of(feed)]
        fed = list({id(v): v for v in values}.values())
        with overridable(model, fed):
            self.runner = Runner(model, label)
        self.references = [self.runner.run(feed) for feed in self.feeds]

    def output_error(self, replaced: dict[str, np.ndarray]) -> float:
        """The relative squared L2 error of the outputs with ``replaced`` fed, summed over
        the outputs."""
        noise = np.zeros(len(self.references[0]))
        signal = np.zeros(len(self.references[0]))
        for feed, reference in zip(self.feeds, self.references):
            outputs = self.runner.run({**feed, **replaced})
            for i, (got, want) in enumerate(zip(outputs, reference)):
                want = np.asarray(want, np.float64)
                noise[i] += float(np.square(np.asarray(got, np.float64) - want).sum())
                signal[i] += float(np.square(want).sum())
        return float(sum(n / s for n, s in zip(noise, signal) if s > 0))

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def macs_per_sample(model: ir.Model, shapes, feeds: Sequence[Feed] | None) -> float:
    """Multiply-adds of one sample: the model's at the resolved shapes, over the batch of
    the first feed."""
    first = next(iter(feeds[0].values()), None) if feeds else None
    batch = len(first) if first is not None and np.ndim(first) else 1
    return model_macs(model, shapes) / max(batch, 1)


def probe_samples(macs_per_sample: float, budget: float = PROBE_MACS) -> int:
    """How many samples the probes run on, for a model of this many multiply-adds a sample:
    as many as fit ``budget`` multiply-adds a probe, within ``PROBE_SAMPLES``."""
    low, high = PROBE_SAMPLES
    return int(min(high, max(low, budget // max(macs_per_sample, 1))))


def probe_feeds(feeds: Sequence[Feed], wanted: int, cut: bool) -> list[Feed]:
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


def _samples_of(feed: Feed) -> list[Feed]:
    """A feed as feeds of one sample each, when its inputs share a leading axis."""
    lengths = {len(a) if np.ndim(a) else None for a in feed.values()}
    length = lengths.pop() if len(lengths) == 1 else None
    if length is None or length <= 1:
        return [feed]
    return [{name: array[i : i + 1] for name, array in feed.items()} for i in range(length)]


@contextmanager
def overridable(model: ir.Model, values: Sequence[ir.Value]):
    """The initializers listed as graph inputs too, while the block runs: a session opened
    inside it takes a fed value in place of the initializer."""
    graph = model.graph
    count = len(graph.inputs)
    typed = [(value, value.shape, value.type) for value in values if not value.is_graph_input()]
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
