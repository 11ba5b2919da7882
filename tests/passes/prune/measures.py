"""Calibration feeds and measures shared by the prune and sparsity pass tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import run
from tests.passes.prune.channel_models import feed_for


def calibration_feeds(proto: onnx.ModelProto, batches: int = 4, batch: int | None = None) -> list:
    return [feed_for(proto, seed=10 + i, batch=batch) for i in range(batches)]


def output_error(reference, candidate, feeds) -> float:
    """Mean relative L2 error of ``candidate``'s outputs against ``reference``'s."""
    errors = []
    for feed in feeds:
        for want, got in zip(run(reference, feed), run(candidate, feed)):
            errors.append(np.linalg.norm(want - got) / np.linalg.norm(want))
    return float(np.mean(errors))


def initializers(proto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i).copy() for i in proto.graph.initializer}
