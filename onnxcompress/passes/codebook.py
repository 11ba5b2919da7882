"""Weight sharing: every large float weight becomes a small codebook plus packed indices,
decoded in the graph by GatherND (k-means scalar codebooks, product quantization, binarization)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Namer, tag
from onnxcompress.graph import default_opset, node_label, weight_array
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.codebook_fit import (
    Fit,
    fit_binary,
    fit_product,
    fit_scalar,
    fit_ternary,
    refine_product,
    refine_scalar,
)
from onnxcompress.passes.codebook_pack import Decoder, layout_for, pack, unpack
from onnxcompress.passes.codebook_stats import LayerStats, collect_stats, correct_bias

logger = logging.getLogger(__name__)

#: BitShift (11), GatherND with batch_dims (12), ReduceSum with axes as an input (13).
DECODE_OPSET = 13
SCHEMES = ("scalar", "pq", "binary", "ternary")
FIXED_BITS = {"binary": 1, "ternary": 2}
DEFAULT_BITS = {"scalar": 4, "pq": 8}
MIN_SIZE = 1024  # default: smaller weights are left alone (biases are vectors anyway)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_CODEBOOK_DTYPES = {"float32": np.float32, "float16": np.float16}


class Codebook(CompressionPass):
    """Float weight W -> Reshape(GatherND(codebook, bit-packed indices)): k-means weight sharing."""

    name = "codebook"
    _seed = 0  # set from the context at each run

    @dataclass(frozen=True)
    class Config:
        """scheme: scalar (k-means), pq (product quantization), binary (α·sign W), ternary."""

        scheme: str = "scalar"
        bits: int | None = None  # index bits (k = 2^bits): scalar 4, pq 8; binary 1, ternary 2
        granularity: str = "channel"  # one codebook per tensor, output channel, or group
        group_size: int | None = None  # output channels per codebook (granularity=group)
        subvector: int = 4  # pq: sub-vector length d
        init: str = "linear"  # scalar k-means seeds: linear over [min, max] or kmeans++
        codebook_dtype: str = "auto"  # auto (the weight's dtype), float16 or float32
        min_size: int = MIN_SIZE  # weights with fewer values are left alone
        zero_share: float = 0.05  # reserve an exact-zero centroid from this share of zeros
        data_aware: bool = False  # refine codebooks and biases on the calibration data
        ops: tuple[str, ...] = ()  # only weights read by these op types (all when empty)
        exclude: tuple[str, ...] = ()  # weight or node-name glob patterns to leave alone

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "scheme": (lambda v: v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
                    "bits": (lambda v: 1 <= v <= 8, "an integer from 1 to 8"),
                    "granularity": (
                        lambda v: v in ("tensor", "channel", "group"),
                        "tensor, channel or group",
                    ),
                    "group_size": (lambda v: v >= 1, "an integer >= 1"),
                    "subvector": (lambda v: v >= 1, "an integer >= 1"),
                    "init": (lambda v: v in ("linear", "kmeans++"), "linear or kmeans++"),
                    "codebook_dtype": (
                        lambda v: v in ("auto", "float16", "float32"),
                        "auto, float16 or float32",
                    ),
                    "min_size": (lambda v: v >= 1, "an integer >= 1"),
                    "zero_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                },
            )
            fixed = FIXED_BITS.get(self.scheme)
            if fixed is not None and self.bits not in (None, fixed):
                raise ValueError(f"bits={self.bits}: scheme {self.scheme} stores {fixed} bit(s)")
            if (self.granularity == "group") != (self.group_size is not None):
                raise ValueError("group_size goes with granularity=group, and only with it")

        @property
        def index_bits(self) -> int:
            return self.bits or FIXED_BITS.get(self.scheme) or DEFAULT_BITS[self.scheme]

    @classmethod
    def applies(cls, node: ir.Node) -> bool:
        return any(
            value is not None and _is_candidate(value) and value.const_value.size >= MIN_SIZE
            for value in node.inputs
        )

    def required_opset(self, model: ir.Model) -> int | None:
        opset = default_opset(model) or DECODE_OPSET
        if opset >= DECODE_OPSET:
            return None
        candidates = (v for v in model.graph.initializers.values() if _is_candidate(v))
        return (
            DECODE_OPSET
            if any(v.const_value.size >= self.config.min_size for v in candidates)
            else None
        )

    def run(self, model: ir.Model, ctx: PassContext) -> PassReport:
        report = PassReport(self.name, self.config_dict())
        weights = [v for v in model.graph.initializers.values() if _is_candidate(v)]
        chosen: list[ir.Value] = []
        for value in weights:
            try:
                self._check(value)
                chosen.append(value)
            except Skip as skip:
                report.layers.append(_skipped(value, str(skip)))
        stats = self._stats(model, chosen, ctx, report)
        self._seed = ctx.seed  # k-means++ and PQ seeds: the same seed gives the same bytes
        builder = _Builder(model, self.name)
        for value in chosen:
            try:
                report.layers.append(self._rewrite(value, builder, stats.get(value.name)))
            except Skip as skip:
                report.layers.append(_skipped(value, str(skip)))
        builder.insert_nodes()
        return report

    def _check(self, value: ir.Value) -> None:
        cfg = self.config
        users = [node for node, _ in value.uses()]
        if value.is_graph_output():
            raise Skip("weight is also a graph output")
        if any(user.graph is not value.graph for user in users):
            raise Skip("weight is read inside a subgraph")
        if value.const_value.size < cfg.min_size:
            raise Skip(f"{value.const_value.size} values < min_size {cfg.min_size}")
        if cfg.ops and not all(user.op_type in cfg.ops for user in users):
            kinds = ", ".join(sorted({u.op_type for u in users}))
            raise Skip(f"read by {kinds}, not in ops")
        if name_matches(_named(value.name), cfg.exclude) or any(
            name_matches(u, cfg.exclude) for u in users
        ):
            raise Skip("excluded by name pattern")

    def _stats(self, model, chosen, ctx: PassContext, report: PassReport) -> dict[str, LayerStats]:
        if not self.config.data_aware:
            return {}
        if not ctx.calibration:
            report.notes.append("data_aware: no calibration feeds, nothing refined")
            return {}
        gram = self.config.scheme in ("scalar", "pq")
        stats, notes = collect_stats(model, chosen, ctx.calibration, with_gram=gram)
        report.notes.extend(notes)
        return stats

    def _rewrite(self, value: ir.Value, builder: _Builder, stats: LayerStats | None) -> LayerReport:
        weight = weight_array(value)
        users = [node for node, _ in value.uses()]
        layout = self._layout(weight, channel_axis(value))
        rows = layout.rows(weight.astype(np.float64))
        fit, detail = self._fit(rows, layout, stats)
        decoded_rows = _decode_rows(fit, self.config.scheme, rows.shape)
        builder.start(value.name)
        stored_dtype = self._codebook_dtype(weight.dtype)
        decoded = self._emit(builder, value, fit, layout, stored_dtype)
        approx = layout.weight(decoded_rows).astype(weight.dtype)
        if stats is not None:
            detail.update(correct_bias(value, weight, approx, stats))
        value.replace_all_uses_with(decoded)
        builder.graph.initializers.pop(value.name)
        return self._layer_report(value, users[0], weight, approx, fit, detail, builder)

    def _layout(self, weight: np.ndarray, axis: int | None) -> _ChannelLayout:
        """Channel-first rows, or one row when per-channel codebooks would cost more bytes
        than the indices they decode (a handful of weights per channel)."""
        cfg = self.config
        if cfg.granularity == "tensor" or cfg.scheme == "pq" or axis is None:
            return _ChannelLayout(weight.shape, None if cfg.scheme != "pq" else axis)
        codebooks = weight.shape[axis] // (cfg.group_size or 1)
        itemsize = self._codebook_dtype(weight.dtype).itemsize
        codebook_bytes = codebooks * (1 << cfg.index_bits) * itemsize
        if codebook_bytes > weight.size * cfg.index_bits / 8:
            return _ChannelLayout(weight.shape, None, fallback=True)
        return _ChannelLayout(weight.shape, axis)

    def _fit(self, rows: np.ndarray, layout, stats: LayerStats | None) -> tuple[Fit, dict]:
        cfg = self.config
        scheme, k = cfg.scheme, 1 << cfg.index_bits
        detail: dict = {"scheme": scheme, "bits": cfg.index_bits, "granularity": layout.granularity}
        if scheme == "pq":
            return self._fit_product(rows, layout, stats, detail)
        groups = self._grouped(rows)
        if scheme == "binary":
            return fit_binary(groups), detail
        if scheme == "ternary":
            return fit_ternary(groups), detail
        fit = fit_scalar(groups, k, cfg.init, cfg.zero_share, np.random.default_rng(self._seed))
        gram = stats.gram if stats is not None else None
        if gram is not None and len(groups) == layout.channels and layout.fc_rows:
            fit, before, after = refine_scalar(groups, fit, gram)
            detail["output_error"] = {"before": round(before, 6), "after": round(after, 6)}
        return fit, detail

    def _grouped(self, rows: np.ndarray) -> np.ndarray:
        """Rows [C, L] as one row per codebook: [1, C·L], [C, L] or [C/size, size·L]."""
        size = self.config.group_size
        if rows.shape[0] == 1 or size is None:
            return rows
        if rows.shape[0] % size:
            raise Skip(f"{rows.shape[0]} channels do not split into groups of {size}")
        return rows.reshape(rows.shape[0] // size, -1)

    def _fit_product(self, rows, layout, stats, detail) -> tuple[Fit, dict]:
        dim = self.config.subvector
        channels, length = rows.shape
        if length % dim:
            raise Skip(f"rows of {length} values do not split into sub-vectors of {dim}")
        if channels < 2:
            raise Skip("pq needs output channels to share codewords (no channel axis)")
        vectors = rows.reshape(channels, length // dim, dim).transpose(1, 0, 2)
        fit = fit_product(vectors, 1 << self.config.index_bits, seed=self._seed)
        detail.update(granularity="subspace", subvector=dim, subspaces=length // dim)
        gram = stats.gram if stats is not None else None
        if gram is not None and layout.fc_rows:
            fit, before, after = refine_product(vectors, fit, gram)
            detail["output_error"] = {"before": round(before, 6), "after": round(after, 6)}
        return fit, detail

    def _codebook_dtype(self, weight_dtype: np.dtype) -> np.dtype:
        choice = self.config.codebook_dtype
        return np.dtype(weight_dtype if choice == "auto" else _CODEBOOK_DTYPES[choice])

    def _emit(self, builder, value, fit: Fit, layout, stored_dtype) -> ir.Value:
        bits = self.config.index_bits
        packed_layout = layout_for(bits, builder.opset)
        stored = pack(fit.indices, bits, packed_layout)
        assert np.array_equal(
            unpack(stored, bits, packed_layout, fit.indices.shape[1]), fit.indices
        )
        codebook = fit.codebook[:, : 1 << bits].astype(stored_dtype)
        groups, count = fit.indices.shape
        indices = builder.decoder.indices(
            builder.weight("indices", stored),
            bits,
            packed_layout,
            groups,
            count,
            flat=self.config.scheme == "pq",
        )
        table = builder.weight("codebook", codebook)
        gathered = builder.op("GatherND", [table, indices], batch_dims=1)  # [G, count, d]
        if self.config.scheme == "pq":
            gathered = builder.op("Transpose", [gathered], perm=[1, 0, 2])
        shape = builder.constant("shape", np.array(layout.channel_first_shape, np.int64))
        decoded = builder.op("Reshape", [gathered, shape])
        if layout.perm != tuple(range(len(layout.perm))):
            decoded = builder.op(
                "Transpose", [decoded], perm=[int(i) for i in np.argsort(layout.perm)]
            )
        if np.dtype(stored_dtype) != value.const_value.dtype.numpy():
            decoded = builder.op("Cast", [decoded], to=value.const_value.dtype)
        builder.detail["layout"] = packed_layout
        return builder.finish(decoded)

    def _layer_report(self, value, first, weight, approx, fit, detail, builder) -> LayerReport:
        norm = float(np.linalg.norm(weight.astype(np.float64)))
        error = float(np.linalg.norm(weight.astype(np.float64) - approx)) / norm if norm else 0.0
        detail.update(builder.detail)
        detail.update(
            weight=value.name,
            shape=list(weight.shape),
            codebooks=len(fit.codebook),
            codebook_entries=int(fit.codebook[:, : 1 << self.config.index_bits].size),
        )
        return LayerReport(
            node=node_label(first),
            op_type=first.op_type,
            action="rewritten",
            detail=detail,
            params_before=weight.size,
            params_after=weight.size,  # as many weights as before: each is now an index
            bytes_before=weight.nbytes,
            bytes_after=builder.stored_bytes,
            weight_error=error,
        )


def _is_candidate(value: ir.Value) -> bool:
    """A constant float tensor with at least two non-trivial axes (vectors are biases/scales)."""
    tensor = value.const_value
    if tensor is None or tensor.dtype not in _FLOAT_TYPES or value.is_graph_input():
        return False
    return sum(1 for size in tensor.shape if size > 1) >= 2 and bool(value.uses())


def channel_axis(value: ir.Value) -> int | None:
    """The output-channel axis of a weight, as its consumers read it (None when unclear)."""
    axes = set()
    rank = len(value.const_value.shape)
    for node, index in value.uses():
        axes.add(_axis_for(node, index, rank))
    return axes.pop() if len(axes) == 1 else None


def _axis_for(node: ir.Node, index: int, rank: int) -> int | None:
    op = node.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1
    if op == "Gemm" and index == 1:
        return 0 if node.attributes.get_int("transB", 0) else 1
    if op == "MatMul" and index == 1:
        return rank - 1
    if op == "Gather" and index == 0 and node.attributes.get_int("axis", 0) == 0:
        return rank - 1  # an embedding table: one codebook per hidden feature
    return None


@dataclass
class _ChannelLayout:
    """The weight moved to channel-first and flattened to rows [C, L]."""

    shape: tuple[int, ...]
    axis: int | None
    fallback: bool = False  # per tensor because per-channel codebooks outweigh the indices

    @property
    def perm(self) -> tuple[int, ...]:
        if self.axis is None:
            return tuple(range(len(self.shape)))
        return (self.axis, *(i for i in range(len(self.shape)) if i != self.axis))

    @property
    def channel_first_shape(self) -> list[int]:
        return [self.shape[i] for i in self.perm]

    @property
    def channels(self) -> int:
        return self.shape[self.axis] if self.axis is not None else 1

    @property
    def granularity(self) -> str:
        if self.fallback:
            return "tensor (per-channel codebooks would outweigh the indices)"
        return "tensor" if self.axis is None else "channel"

    @property
    def fc_rows(self) -> bool:
        """Rows are output rows over input features (a 2-D fully connected weight)."""
        return self.axis is not None and len(self.shape) == 2

    def rows(self, weight: np.ndarray) -> np.ndarray:
        return weight.transpose(self.perm).reshape(self.channels, -1)

    def weight(self, rows: np.ndarray) -> np.ndarray:
        return rows.reshape(self.channel_first_shape).transpose(np.argsort(self.perm))


def _decode_rows(fit: Fit, scheme: str, shape: tuple[int, int]) -> np.ndarray:
    """The approximated rows [C, L], as the decoder graph will compute them."""
    if scheme == "pq":
        gathered = np.take_along_axis(fit.codebook, fit.indices[:, :, None].astype(np.int64), 1)
        return gathered.transpose(1, 0, 2).reshape(shape)
    return fit.decode().reshape(shape)


def _named(name: str) -> ir.Node:
    """A stand-in node so weight names match the same glob patterns as node names."""
    stand_in = ir.Node("", "Identity", [])
    stand_in.name = name
    return stand_in


def _skipped(value: ir.Value, reason: str) -> LayerReport:
    users = [node for node, _ in value.uses()]
    if not users:
        return LayerReport(value.name or "?", "initializer", "skipped", reason=reason)
    report = LayerReport.skipped(users[0], reason)
    report.detail = {"weight": value.name}
    return report


@dataclass
class _Builder:
    """Creates the decoder of one weight after another and accounts for its stored bytes."""

    model: ir.Model
    pass_name: str
    nodes: list[ir.Node] = field(default_factory=list)
    shared: dict[tuple, ir.Value] = field(default_factory=dict)
    stored_bytes: int = 0
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph = self.model.graph
        self.namer = Namer(self.model)
        self.opset = default_opset(self.model) or DECODE_OPSET
        self.decoder = Decoder(self.nodes, self.constant, self._shared_constant)
        self._base = ""

    def start(self, weight_name: str) -> None:
        self._base, self.stored_bytes, self.detail, self._first = (
            weight_name,
            0,
            {},
            len(self.nodes),
        )

    def weight(self, kind: str, array: np.ndarray) -> ir.Value:
        self.detail[f"{kind}_bytes"] = _nbytes(array)
        return self.constant(kind, array)

    def constant(self, kind: str, array: np.ndarray) -> ir.Value:
        name = self.namer.fresh(f"{self._base}.codebook.{kind}")
        tensor = ir.Tensor(np.asarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        self.stored_bytes += _nbytes(array)
        return value

    def _shared_constant(self, kind: str, array: np.ndarray) -> ir.Value:
        """One initializer per distinct small array in the model (counted where first made)."""
        array = np.asarray(array)
        key = (kind, array.dtype.str, array.shape, array.tobytes())
        if key not in self.shared:
            base, self._base = self._base, "codebook"
            self.shared[key] = self.constant(kind, array)
            self._base = base
        return self.shared[key]

    def op(self, op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes)
        self.nodes.append(node)
        return node.outputs[0]

    def finish(self, decoded: ir.Value) -> ir.Value:
        """Name and tag this weight's decoder nodes; the decoded value takes a readable name."""
        for node in self.nodes[self._first :]:
            node.name = self.namer.fresh(f"{self._base}.codebook.{node.op_type}")
            tag(node, self.pass_name)
            for output in node.outputs:
                output.name = self.namer.fresh(f"{node.name}.out")
        decoded.name = self.namer.fresh(f"{self._base}.decoded")
        return decoded

    def insert_nodes(self) -> None:
        """Decoders read only initializers, so they go first in the graph (still sorted)."""
        if not self.nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(self.nodes)
        else:
            self.graph.insert_before(first, self.nodes)


def _nbytes(array: np.ndarray) -> int:
    """Bytes as stored in the ONNX file (4-bit types pack two values a byte)."""
    array = np.asarray(array)
    if array.dtype.itemsize == 1 and "int4" in array.dtype.name:
        return math.ceil(array.size / 2)
    return int(array.nbytes)
