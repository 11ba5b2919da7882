"""How much of a weight's error reaches the model's outputs, measured once per weight.

The relative error a codebook causes in one layer's output reaches the model's outputs
scaled by a factor that differs by orders of magnitude from layer to layer: on
EfficientNet-Lite1 a 3×3 depthwise conv passes on 2-5% of it, the 1×1 projection that starts
a residual stream 3-10 times it. So each weight is probed once (a 3-bit per-channel codebook)
and the model's output error is measured with that weight alone changed; the ratio of the
two errors is the weight's *gain*, and a choice's predicted output error is its layer error
times the gain. The probes share a few onnxruntime sessions (``probes.ProbeSession``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.probes import PROBE_SAMPLES, ProbeSession

PROBE_BITS = 3

#: A weight's probe: the values to feed in place of initializers (the approximated weight,
#: and its bias corrected for the mean shift when there is data), and the layer error.
Probe = Callable[[ir.Value], tuple[dict[str, np.ndarray], float]]


def output_gains(
    model: ir.Model,
    weights: Sequence[ir.Value],
    probe: Probe,
    feeds: Sequence[Feed],
    also: Mapping[str, Sequence[ir.Value]] | None = None,
    samples: int = PROBE_SAMPLES[0],
    done: Callable[[], None] = lambda: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """Per weight name: the model's output error (relative squared L2, summed over the
    outputs) with that weight alone replaced by its probe, over the probe's layer error.
    ``also``: per weight name, other initializers its probe may replace (its bias).
    ``done`` is called after each weight; ``cancelled`` is asked before each (true: stop,
    the gains left unmeasured)."""
    also = also or {}
    label = "model for codebook sensitivity"
    probes = [[value, *also.get(value.name, ())] for value in weights]
    with ProbeSession(model, probes, feeds, samples, label, before_squashing=True) as session:
        gains = {}
        for value in weights:
            if cancelled():
                raise ProbesCancelled("codebook gains: cancelled")
            replaced, layer_error = probe(value)
            gains[value.name] = 0.0
            if layer_error > 0:
                gains[value.name] = session.output_error(replaced) / layer_error
            done()
    return gains


class ProbesCancelled(Exception):
    """The caller stopped the probes (it failed or was interrupted meanwhile)."""
