"""What each layer should produce, for lowrank's data-aware fits: one layer at a time, the
*student's* input rows (the model as compressed so far) against the *teacher's* output rows
(the original model), summed a batch at a time into ``SecondMoments``, so fitting one layer
accounts for the error of the ones before it (asymmetric reconstruction). A layer an earlier
pass created has no counterpart in the original model: its target is the model as this pass
found it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.passes.lowrank.layer import Layer
from onnxcompress.stats import SecondMoments, captured_pairs, layer_rows
from onnxcompress.validate import Runner


class LayerTargets:
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

    def moments(self, layer: Layer) -> SecondMoments:
        """Sums over every calibration feed for ``layer`` in the model as it is now."""
        node = layer.node
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        moments = SecondMoments()
        teacher = self.targets[y_name]
        for xs, ys in captured_pairs(self.model, [x_name], teacher, [y_name], self.feeds):
            moments.add(*layer_rows(node, xs[x_name], ys[y_name], self.max_rows, self.rng))
        return moments

    def close(self) -> None:
        for runner in set(self.targets.values()) | {self.teacher}:
            runner.close()
