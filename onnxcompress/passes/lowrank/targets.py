"""What each layer should produce, for lowrank's data-aware fits: one layer at a time, the
*student's* input rows (the model as compressed so far) against the *teacher's* output rows
(the original model), summed a batch at a time into ``SecondMoments``, so fitting one layer
accounts for the error of the ones before it (asymmetric reconstruction). A layer an earlier
pass created has no counterpart in the original model: its target is the model as this pass
found it.

Layers are captured in *waves*: the next few layers, as many as ``WAVE_BYTES`` of their
inputs and outputs a feed allow (up to ``WAVE_LAYERS``), from one sweep of the student and
one of the teacher, instead of two whole-model sweeps per layer. Sums captured for later
layers stay valid while the layers ahead of them are left as they are (skipped by a guard or
by ``max_error``); a rewrite ``forget``s them, and the next layer starts a new wave. So every
layer sees exactly what a capture of its own would give, and a search that rewrites few
layers (``max_error`` on a mobile CNN) costs a few sweeps instead of two a layer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.passes.lowrank.layer import Layer
from onnxcompress.stats import SecondMoments, captured_pairs, layer_rows
from onnxcompress.validate import Runner

#: A wave holds at most this many layers, and this many bytes of their inputs and outputs
#: for one feed.
WAVE_LAYERS = 8
WAVE_BYTES = 192 << 20


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
        upcoming: Sequence[ir.Node] = (),
        shapes: dict | None = None,
    ) -> None:
        self.model, self.feeds, self.max_rows = model, feeds, max_rows
        self.upcoming = list(upcoming)  # the layers in the order moments will be asked for
        self.shapes = shapes or {}
        self.ready: dict[str, SecondMoments] = {}
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
        """Sums over every calibration feed for ``layer`` in the model as it is now (captured
        with its wave, before which nothing has been rewritten since)."""
        node = layer.node
        if node.outputs[0].name not in self.ready:
            self._capture(self._wave(node))
        return self.ready.pop(node.outputs[0].name)

    def forget(self) -> None:
        """Drop the sums captured ahead: the student just changed."""
        self.ready.clear()

    def _wave(self, node: ir.Node) -> list[ir.Node]:
        """``node`` and the layers after it, while they share a teacher and fit the budget."""
        later = self.upcoming[self.upcoming.index(node) + 1 :] if node in self.upcoming else []
        teacher = self.targets[node.outputs[0].name]
        wave, room = [node], WAVE_BYTES - self._bytes(node)
        for other in later:
            size = self._bytes(other)
            if len(wave) >= WAVE_LAYERS or size > room or other.graph is None:
                break
            if self.targets.get(other.outputs[0].name) is teacher:
                wave.append(other)
                room -= size
        return wave

    def _bytes(self, node: ir.Node) -> float:
        """A feed's bytes of the layer's input and output (unknown: the whole budget)."""
        total = 0
        for value in (node.inputs[0], node.outputs[0]):
            shape = self.shapes.get(value.name)
            if not shape or not all(isinstance(d, int) for d in shape):
                return WAVE_BYTES
            total += 4 * int(np.prod(shape))
        return total

    def _capture(self, wave: list[ir.Node]) -> None:
        x_names = list(dict.fromkeys(node.inputs[0].name for node in wave))
        y_names = [node.outputs[0].name for node in wave]
        teacher = self.targets[y_names[0]]
        sums = {name: SecondMoments() for name in y_names}
        for xs, ys in captured_pairs(self.model, x_names, teacher, y_names, self.feeds):
            for node in wave:
                x, y = xs[node.inputs[0].name], ys[node.outputs[0].name]
                sums[node.outputs[0].name].add(*layer_rows(node, x, y, self.max_rows, self.rng))
        self.ready.update(sums)

    def close(self) -> None:
        for runner in set(self.targets.values()) | {self.teacher}:
            runner.close()
