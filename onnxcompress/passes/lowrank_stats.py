"""Calibration statistics for lowrank: for one layer at a time, the *student's* input rows (the
model as compressed so far) against the *teacher's* output rows (the original model), summed
a batch at a time into a LayerStats, so fitting one layer accounts for the error of the ones
before it (asymmetric reconstruction). A layer an earlier pass created has no counterpart in the
original model: its target is the model as this pass found it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.conv import channels_last, im2col, sample_rows
from onnxcompress.passes.factorize import LayerStats
from onnxcompress.validate import Runner

if TYPE_CHECKING:
    from onnxcompress.passes.lowrank import Layer


class StatsCollector:
    def __init__(
        self,
        model: ir.Model,
        teacher: Runner,
        feeds: Sequence[Feed],
        outputs: Sequence[str],
        max_rows: int,
        seed: int,
        fit: bool,
    ) -> None:
        self.model, self.feeds, self.max_rows = model, feeds, max_rows
        self.fit = fit  # refit factors to the data, or only measure errors on it
        known = teacher.value_names()
        original = [name for name in outputs if name in known]
        created = [name for name in outputs if name not in known]
        self.teacher = teacher.with_outputs(original, "original model")
        self.targets = dict.fromkeys(original, self.teacher)
        if created:  # a frozen copy: this pass goes on changing ``model``
            before = Runner(model, "model before this pass", extra_outputs=created)
            self.targets.update(dict.fromkeys(created, before))
        self.rng = np.random.default_rng(seed)

    def collect(self, layer: Layer) -> LayerStats:
        """Sums over every calibration feed for ``layer`` in the model as it is now."""
        node = layer.node
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        out_channels, inputs = layer.matrix.shape
        stats = LayerStats.empty(inputs, out_channels)
        student = Runner(self.model, "model being compressed", extra_outputs=[x_name])
        try:
            for feed in self.feeds:
                x = student.capture(feed)[x_name]
                y = self.targets[y_name].capture(feed, [y_name])[y_name]
                x_rows, y_rows = self._rows(layer, x, y)
                stats.add(x_rows, y_rows)
        finally:
            student.close()
        return stats

    def _rows(self, layer: Layer, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Matching input and output rows; a seeded sample keeps the cost per batch bounded."""
        if layer.geometry is not None:
            keep = sample_rows(y.size // y.shape[1], self.max_rows, self.rng)
            return im2col(x, layer.geometry, keep), channels_last(y, keep)
        if layer.kind == "Gemm" and layer.node.attributes.get_int("transA", 0):
            x = x.T
        x_rows = x.reshape(-1, layer.matrix.shape[1])
        y_rows = y.reshape(-1, layer.matrix.shape[0])
        keep = sample_rows(len(x_rows), self.max_rows, self.rng)
        return (x_rows, y_rows) if keep is None else (x_rows[keep], y_rows[keep])

    def close(self) -> None:
        for runner in set(self.targets.values()) | {self.teacher}:
            runner.close()
