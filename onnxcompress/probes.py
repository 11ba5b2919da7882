"""Probes: the model's output error with a few initializers replaced, many replacements to
an onnxruntime session.

Passes that weigh their choices by what reaches the model's outputs (codebook's per-weight
gains, prune's per-group sensitivity) open sessions in which the initializers they may
replace are graph inputs too (``Runner.with_overridable``): onnxruntime then takes a fed
value in place of the initializer, so each probe is one run, not one session.

An initializer that is a graph input is no constant to onnxruntime: its convs are not
repacked or fused, and a run with all 60 weights of EfficientNet-Lite1 overridable took
133 ms an image against 29 ms for the plain model. So the probes are cut into runs of
``PROBES_PER_SESSION``, each with a session of its own in which only its values are
overridable (about 0.1 s to open). The reference outputs come from the plain model (the
kernels differ, but by float rounding: about 1e-5 of the gains measured on Lite1).
"""

from __future__ import annotations

from collections.abc import Sequence

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
#: Probes that share one session (their values overridable together).
PROBES_PER_SESSION = 4


class ProbeSession:
    """Sessions on ``model`` in which the values of each probe (``probes``: the initializers
    each probe may replace, in the order they will be probed) may be replaced run by run,
    with the reference outputs on the first ``samples`` samples of ``feeds``."""

    def __init__(
        self,
        model: ir.Model,
        probes: Sequence[Sequence[ir.Value]],
        feeds: Sequence[Feed],
        samples: int,
        label: str,
        before_squashing: bool = False,
    ) -> None:
        fixed = any(
            value.shape is None or not value.shape or isinstance(value.shape[0], int)
            for value in model.graph.inputs
        )
        self.feeds = probe_feeds(feeds, samples, cut=not fixed)
        if not fixed:  # one sample a run: the session's arena stays that of batch 1
            self.feeds = [one for feed in self.feeds for one in _samples_of(feed)]
        self.chunks = _chunks(probes, PROBES_PER_SESSION)
        outputs = [value.name for value in model.graph.outputs]
        self.targets = unsquashed(model) if before_squashing else outputs
        extra = [] if self.targets == outputs else self.targets
        # the model is written once; each chunk's session reads it with its inputs added
        self.base = Runner(model, label, extra_outputs=extra)
        self.references = [self._run(self.base, feed) for feed in self.feeds]
        self.base.release()
        self.runner: Runner | None = None
        self.names: set[str] = set()

    def output_error(self, replaced: dict[str, np.ndarray]) -> float:
        """The relative squared L2 error of the outputs with ``replaced`` fed, summed over
        the outputs."""
        self._covering(set(replaced))
        noise = np.zeros(len(self.references[0]))
        signal = np.zeros(len(self.references[0]))
        for feed, reference in zip(self.feeds, self.references):
            outputs = self._run(self.runner, {**feed, **replaced})
            for i, (got, want) in enumerate(zip(outputs, reference)):
                want = np.asarray(want, np.float64)
                noise[i] += float(np.square(np.asarray(got, np.float64) - want).sum())
                signal[i] += float(np.square(want).sum())
        return float(sum(n / s for n, s in zip(noise, signal) if s > 0))

    def _run(self, runner: Runner, feed: Feed) -> list[np.ndarray]:
        """The values the error is measured on: the outputs, or what they squash."""
        if not runner.extra_outputs:
            return runner.run(feed)
        values = runner.capture(feed, self.targets)
        return [values[name] for name in self.targets]

    def _covering(self, names: set[str]) -> None:
        """The session whose overridable values hold ``names`` (the current one, else the
        first chunk that holds them)."""
        if self.runner is not None and names <= self.names:
            return
        chunk = next((c for c in self.chunks if names <= c), None)
        if chunk is None:
            raise RuntimeError(f"internal: no probe declared to replace {sorted(names)}")
        self._close_chunk()
        self.runner = self.base.with_overridable(sorted(chunk))
        self.names = chunk

    def _close_chunk(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def close(self) -> None:
        self._close_chunk()
        self.base.close()

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


#: Outputs that squash their input into (0, 1): where they saturate (a confident classifier's
#: softmax), an error in the layers before barely moves them, and a probe measured there
#: calls a layer harmless that is not (PP-OCR's orientation classifier: gains of 1e-6).
SQUASHING = {"Softmax", "Sigmoid"}
#: Ops that only rearrange values, looked through on the way back from an output.
REARRANGING = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


def unsquashed(model: ir.Model) -> list[str]:
    """Per graph output, the input of the Softmax or Sigmoid that makes it (through ops that
    only rearrange values), or the output itself."""
    names = []
    for output in model.graph.outputs:
        value = output
        while (node := value.producer()) is not None and node.op_type in REARRANGING:
            value = node.inputs[0]
        squashes = node is not None and node.op_type in SQUASHING and node.domain in ("", "ai.onnx")
        names.append(node.inputs[0].name if squashes else output.name)
    return names


def _chunks(probes: Sequence[Sequence[ir.Value]], size: int) -> list[set[str]]:
    """The names of the probes' values, ``size`` probes at a time."""
    return [
        {value.name for probe in probes[start : start + size] for value in probe}
        for start in range(0, len(probes), size)
    ]


def _samples_of(feed: Feed) -> list[Feed]:
    """A feed as feeds of one sample each, when its inputs share a leading axis."""
    lengths = {len(a) if np.ndim(a) else None for a in feed.values()}
    length = lengths.pop() if len(lengths) == 1 else None
    if length is None or length <= 1:
        return [feed]
    return [{name: array[i : i + 1] for name, array in feed.items()} for i in range(length)]
