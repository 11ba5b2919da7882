"""Latency of one layer in onnxruntime, measured on this machine: the basis for rewrites that are
kept only when they run faster (lowrank's ``min_speedup``).

A layer is timed alone, in a model of its own, from onnxruntime's per-kernel profile rather than
the wall clock, so session overhead does not flatten the ratio. Layout conversions at the
model's edges (the NCHWc reorders onnxruntime adds around convs) are left out: inside the whole
model, tensors flow between convs in that layout without them. A conversion *between* the
layer's own nodes is counted, since it is the price of a rank the kernels do not like.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxcompress.errors import CannotRun

_REORDERS = ("ReorderInput", "ReorderOutput")
_KERNEL_SUFFIX = "_kernel_time"


def isolate(node: ir.Node, input_shape: Sequence[int], opsets: dict[str, int]) -> ir.Model:
    """A model of ``node`` alone: its first input becomes the graph input (of ``input_shape``),
    its other inputs must be constants, and they are shared, not copied."""
    source = node.inputs[0]
    constants = [_constant(value) for value in node.inputs[1:]]
    dtype = source.dtype or next(c.const_value.dtype for c in constants if c is not None)
    x = ir.Value(name=source.name or "x", shape=ir.Shape(input_shape), type=ir.TensorType(dtype))
    clone = ir.Node(
        node.domain,
        node.op_type,
        [x, *constants],
        attributes=list(node.attributes.values()),
        name=node.name,
        num_outputs=1,
    )
    clone.outputs[0].name = node.outputs[0].name
    graph = ir.Graph(
        [x],
        [clone.outputs[0]],
        nodes=[clone],
        initializers=[c for c in constants if c is not None],
        opset_imports=opsets,
    )
    return ir.Model(graph, ir_version=10)


def _constant(value: ir.Value | None) -> ir.Value | None:
    if value is None:
        return None
    if value.const_value is None:
        raise ValueError(f"input {value.name!r} is not a constant")
    return ir.Value(name=value.name, const_value=value.const_value)


_WARM_UP = 2  # the first runs allocate and pack weights


class _Profiled:
    """One profiling onnxruntime session on ``model``, fed ``feed`` or, for a model of one
    input of static shape, seeded noise."""

    def __init__(
        self, model: ir.Model, folder: Path, threads: int, seed: int = 0, feed=None
    ) -> None:
        if feed is None:
            (x,) = model.graph.inputs
            shape = [int(d) for d in x.shape]
            noise = np.random.default_rng(seed).standard_normal(shape)
            feed = {x.name: noise.astype(x.dtype.numpy())}
        self.feed = feed
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "profile")
        self.optimized = folder / "optimized.onnx"
        options.optimized_model_filepath = str(self.optimized)
        try:
            self.session = ort.InferenceSession(
                ir.to_proto(model).SerializeToString(), options, ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise CannotRun(f"onnxruntime cannot time the layer: {exc}".splitlines()[0]) from None
        self.run(_WARM_UP)

    def run(self, times: int) -> None:
        try:
            for _ in range(times):
                self.session.run(None, self.feed)
        except Exception as exc:
            raise CannotRun(f"onnxruntime cannot time the layer: {exc}".splitlines()[0]) from None

    def rounds(self, runs: int) -> list[float]:
        """Per round of ``runs``: the median microseconds per run, summed over the nodes."""
        timed = [times[_WARM_UP:] for times in self.durations().values()]
        count = min((len(times) for times in timed), default=0) // runs
        return [
            float(sum(np.median(times[k * runs : (k + 1) * runs]) for times in timed))
            for k in range(count)
        ]

    def durations(self) -> dict[str, list[float]]:
        """Microseconds of every run (warm-up included) per kernel, edge reorders left out;
        ends the profile."""
        profile = Path(self.session.end_profiling())
        edges = _edge_reorders(onnx.load(self.optimized, load_external_data=False))
        return _kernel_durations(json.loads(profile.read_text()), edges)


def kernel_microseconds(model: ir.Model, runs: int = 40, threads: int = 1) -> float:
    """Median microseconds per run that onnxruntime's CPU kernels spend on ``model``, summed
    over nodes, edge layout conversions excluded."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-latency-") as folder:
        profiled = _Profiled(model, Path(folder), threads)
        profiled.run(runs)
        return profiled.rounds(runs)[0]


def node_times(
    model: ir.Model, feed, runs: int = 20, threads: int = 1
) -> dict[ir.Node | None, float]:
    """Median microseconds per run that onnxruntime spends on each node of ``model``. A
    kernel onnxruntime made by fusing or relaying out nodes (a Conv with its Clip, a conv in
    the blocked NCHWc layout, named after its output) is charged to the node with
    multiply-adds it grew from; what cannot be traced is summed under ``None``. Unnamed nodes
    are named for the profile and given their empty names back."""
    unnamed = [node for node in model.graph if not node.name]
    for index, node in enumerate(unnamed):
        node.name = f"onnxcompress_timed_{index}"
    try:
        with tempfile.TemporaryDirectory(prefix="onnxcompress-latency-") as folder:
            profiled = _Profiled(model, Path(folder), threads, feed=feed)
            profiled.run(runs)
            durations = profiled.durations()
        producers = {v.name: n for n in model.graph for v in n.outputs if v is not None}
        by_name = {n.name: n for n in model.graph}
        times: dict[ir.Node | None, float] = defaultdict(float)
        for kernel, values in durations.items():
            median = float(np.median(values[_WARM_UP:] or values))
            times[_origin(kernel, by_name, producers)] += median
        return dict(times)
    finally:
        for node in unnamed:
            node.name = ""


_FUSED_SUFFIXES = ("_nchwc",)
#: Ops onnxruntime folds into the kernel of the layer before them.
_FOLDED_INTO_PRODUCER = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Mul", "Sum"}
)


def _origin(kernel: str, by_name: dict[str, ir.Node], producers) -> ir.Node | None:
    """The node a profiled kernel stands for: itself, or the MAC node its output grew from."""
    if kernel in by_name:
        return by_name[kernel]
    for suffix in _FUSED_SUFFIXES:
        kernel = kernel.removesuffix(suffix)
    node = producers.get(kernel)
    for _ in range(3):  # back through the activations and sums fused into it
        if node is None or node.op_type not in _FOLDED_INTO_PRODUCER:
            break
        feeding = [producers.get(v.name) for v in node.inputs if v is not None]
        macs = [n for n in feeding if n is not None and n.op_type in _MAC_OPS]
        node = macs[0] if macs else (feeding[0] if len(feeding) == 1 else None)
    return node


_MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _edge_reorders(optimized: onnx.ModelProto) -> set[str]:
    """Names of the layout conversions that read a graph input or write a graph output."""
    inputs = {value.name for value in optimized.graph.input}
    outputs = {value.name for value in optimized.graph.output}
    return {
        node.name
        for node in optimized.graph.node
        if node.op_type in _REORDERS
        and (node.input[0] in inputs or any(name in outputs for name in node.output))
    }


def _kernel_durations(events: list[dict], skip: set[str]) -> dict[str, list[float]]:
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX):
            continue
        node = name[: -len(_KERNEL_SUFFIX)]
        if node not in skip:
            durations[node].append(float(event["dur"]))
    return durations


#: ``speedup``'s settings (part of the timing cache's key).
SPEEDUP_RUNS, SPEEDUP_ROUNDS = 40, 3


def speedup(
    before: ir.Model, after: ir.Model, runs: int = SPEEDUP_RUNS, rounds: int = SPEEDUP_ROUNDS
) -> float:
    """How many times faster ``after`` runs than ``before`` (see ``speedup_times``)."""
    fastest_before, fastest_after = speedup_times(before, after, runs, rounds)
    return fastest_before / fastest_after if fastest_after > 0 else math.inf


def speedup_times(
    before: ir.Model, after: ir.Model, runs: int = SPEEDUP_RUNS, rounds: int = SPEEDUP_ROUNDS
) -> tuple[float, float]:
    """Microseconds per run of ``before`` and ``after``: the best of ``rounds`` alternating
    rounds on one session each, so a burst of load on a shared machine hits both alike."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-latency-") as folder:
        sessions = []
        for label, model in (("before", before), ("after", after)):
            (Path(folder) / label).mkdir()
            sessions.append(_Profiled(model, Path(folder) / label, threads=1))
        for _ in range(rounds):
            for session in sessions:
                session.run(runs)
        fastest_before, fastest_after = (min(session.rounds(runs)) for session in sessions)
    return fastest_before, fastest_after
