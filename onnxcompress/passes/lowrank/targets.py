"""What each layer should produce, for lowrank's data-aware fits: the *teacher's* output rows
(the original model) against input rows, summed a sample at a time into ``SecondMoments``. A
layer an earlier pass created has no counterpart in the original model: its target is the
model as this pass found it.

Where the input rows come from is the ``inputs`` option:

- ``student``: the model as compressed so far, so fitting one layer accounts for the error of
  the ones before it (asymmetric reconstruction). Layers are captured in *waves* (the next
  few, from one sweep of the student and one of the teacher); a rewrite ``forget``s the sums
  captured ahead, so every layer sees exactly what a capture of its own would give, and each
  rewritten layer costs a sweep of both models.
- ``teacher``: the original model's inputs (symmetric): every layer's sums come from sweeps
  of the teacher alone, as many layers a sweep as memory allows (all of a mobile CNN's), and
  rewrites forget nothing.

Rows are sampled per layer, feed and sample from a generator seeded by those three, so the
sums do not depend on how layers are grouped into sweeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.calibration import Feed
from onnxcompress.passes.lowrank.layer import Layer
from onnxcompress.stats import SecondMoments, layer_rows
from onnxcompress.validate import Runner

#: A wave holds at first this many layers (student inputs), at most this many bytes of
#: their inputs and outputs for one sample, and this many bytes of sums.
WAVE_LAYERS = 8
WAVE_BYTES = 192 << 20
WAVE_SUM_BYTES = 384 << 20
#: A feed whose wave values take at most this many bytes is captured whole, not a sample at
#: a time: a run per sample of an MLP's batches (rows are samples) made the lowrank tests on
#: the MNIST MLP 3-5x slower for no memory worth saving.
WHOLE_FEED_BYTES = 32 << 20
INPUTS = ("student", "teacher")


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
        inputs: str = "student",
    ) -> None:
        self.model, self.feeds, self.max_rows, self.seed = model, feeds, max_rows, seed
        self.upcoming = list(upcoming)  # the layers in the order moments will be asked for
        self.index = {id(node): i for i, node in enumerate(self.upcoming)}
        self.shapes = shapes or {}
        self.ready: dict[str, SecondMoments] = {}
        self.fit = fit  # refit factors to the data, or only measure errors on it
        self.inputs = inputs
        self.sweeps = 0  # model sweeps so far (a student and a teacher sweep count one each)
        # student inputs: a wave's size doubles after a wave used whole (nothing rewritten),
        # and starts over after a rewrite, which throws away the sums captured ahead
        self.wave_layers, self.rewritten = WAVE_LAYERS, True
        known = teacher.value_names()
        original = [name for name in outputs if name in known]
        created = [name for name in outputs if name not in known]
        self.teacher = teacher.with_outputs(self._exposed(original), "original model")
        self.targets = dict.fromkeys(original, self.teacher)
        if created:  # a frozen copy: this pass goes on changing ``model``
            before = Runner(model, "model before this pass", self._exposed(created))
            self.targets.update(dict.fromkeys(created, before))

    def _exposed(self, outputs: list[str]) -> list[str]:
        """What a target session exposes: the layers' outputs, and with teacher inputs the
        layers' inputs too."""
        if self.inputs == "student":
            return outputs
        wanted, graph_inputs = set(outputs), {v.name for v in self.model.graph.inputs}
        nodes = [n for n in self.upcoming if n.outputs[0].name in wanted]
        taken = [n.inputs[0].name for n in nodes if n.inputs[0].name not in graph_inputs]
        return list(dict.fromkeys([*taken, *outputs]))  # graph inputs come from the feeds

    def moments(self, layer: Layer) -> SecondMoments:
        """Sums over every calibration feed for ``layer`` in the model as it is now (captured
        with its wave, before which nothing has been rewritten since, with student inputs)."""
        node = layer.node
        if node.outputs[0].name not in self.ready:
            if not self.rewritten:
                self.wave_layers *= 2
            self.rewritten = False
            self._capture(self._wave(node))
        return self.ready.pop(node.outputs[0].name)

    def forget(self) -> None:
        """The student just changed: drop the sums captured ahead from its inputs."""
        if self.inputs == "student":
            self.ready.clear()
            self.wave_layers, self.rewritten = WAVE_LAYERS, True

    def _wave(self, node: ir.Node) -> list[ir.Node]:
        """``node`` and the layers after it, while they share a teacher and fit the budget."""
        later = self.upcoming[self.index[id(node)] + 1 :] if id(node) in self.index else []
        teacher = self.targets[node.outputs[0].name]
        most = self.wave_layers if self.inputs == "student" else len(self.upcoming) + 1
        wave, room, sums = [node], WAVE_BYTES - self._bytes(node), WAVE_SUM_BYTES
        sums -= self._sum_bytes(node)
        for other in later:
            size, sum_size = self._bytes(other), self._sum_bytes(other)
            if len(wave) >= most or size > room or sum_size > sums or other.graph is None:
                break
            if self.targets.get(other.outputs[0].name) is teacher:
                wave.append(other)
                room, sums = room - size, sums - sum_size
        return wave

    def _bytes(self, node: ir.Node) -> float:
        """A sample's bytes of the layer's input and output (unknown: the whole budget)."""
        total = 0
        for value in (node.inputs[0], node.outputs[0]):
            shape = self.shapes.get(value.name)
            if not shape or not all(isinstance(d, int) for d in shape):
                return WAVE_BYTES
            total += 4 * math.prod(shape[1:])
        return total

    def _sum_bytes(self, node: ir.Node) -> int:
        """Bytes of the layer's ``SecondMoments`` (float64 [D+1, D+1] and [D+1, O])."""
        weight = node.inputs[1].const_value if len(node.inputs) > 1 else None
        if weight is None:
            return 0
        shape = weight.shape
        if node.op_type in ("Conv", "ConvTranspose"):
            features, outputs = math.prod(shape[1:]), shape[0]
        else:
            features, outputs = shape[0], shape[-1]
        return 8 * (features + 1) * (features + 1 + outputs)

    def _capture(self, wave: list[ir.Node]) -> None:
        runner = self.targets[wave[0].outputs[0].name]
        x_names = list(dict.fromkeys(node.inputs[0].name for node in wave))
        student = None
        if self.inputs == "student":  # a session on the model as compressed so far
            student = Runner(self.model, "model being compressed", extra_outputs=x_names)
        sums = {node.outputs[0].name: SecondMoments() for node in wave}
        try:
            for feed_index, feed in enumerate(self.feeds):
                parts = self._parts(wave, x_names, runner, student, feed)
                for part_index, (xs, ys, share) in enumerate(parts):
                    self._add(wave, sums, xs, ys, (feed_index, part_index, share))
        finally:
            if student is not None:
                student.close()
        self.sweeps += 1 + (student is not None)
        self.ready.update(sums)

    def _add(self, wave, sums, xs, ys, where: tuple[int, int, float]) -> None:
        """One part's rows of every layer of the wave, added to its sums."""
        feed_index, part_index, share = where
        rows = max(1, math.ceil(self.max_rows * share))
        for node in wave:
            x, y = xs[node.inputs[0].name], ys[node.outputs[0].name]
            layer = self.index.get(id(node), -1) + 1
            rng = np.random.default_rng((self.seed, layer, feed_index, part_index))
            sums[node.outputs[0].name].add(*layer_rows(node, x, y, rows, rng))
        xs.clear(), ys.clear()  # the next part's run needs the memory

    def _parts(self, wave, x_names, runner: Runner, student: Runner | None, feed: Feed):
        """(inputs, outputs, the part's share of the feed): the whole feed when its values
        are small (``WHOLE_FEED_BYTES``), else a sample at a time."""
        y_names = [node.outputs[0].name for node in wave]
        parts = runner.part_count(feed)
        whole = parts * sum(self._bytes(node) for node in wave) <= WHOLE_FEED_BYTES
        if student is None and whole:
            values = runner.capture(feed, [*x_names, *y_names])
            yield values, values, 1.0
        elif student is None:  # teacher inputs: one session gives both
            for values in runner.capture_parts(feed, [*x_names, *y_names]):
                yield values, values, 1 / parts
        elif whole or student.part_count(feed) != parts:  # one side runs whole feeds: both do
            yield student.capture(feed, x_names), runner.capture(feed, y_names), 1.0
        else:
            pairs = zip(student.capture_parts(feed, x_names), runner.capture_parts(feed, y_names))
            for xs, ys in pairs:
                yield xs, ys, 1 / parts

    def close(self) -> None:
        for runner in set(self.targets.values()) | {self.teacher}:
            runner.close()
