"""Weight sharing: every large float weight becomes a small codebook plus packed indices,
decoded in the graph by GatherND (k-means scalar codebooks, product quantization, binarization)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxcompress.emit import Emitter
from onnxcompress.graph import default_opset, values_problem, weight_array
from onnxcompress.passes.base import (
    CompressionPass,
    LayerReport,
    PassContext,
    PassReport,
    Skip,
    check_fields,
    name_matches,
)
from onnxcompress.passes.codebook.allocate import (
    Choice,
    grouped_rows,
    target_bytes,
    ungrouped,
)
from onnxcompress.passes.codebook.data_aware import (
    InputStats,
    collect_stats,
    correct_bias,
)
from onnxcompress.passes.codebook.decoder import DECODE_OPSET, DecoderBuilder, stored_nbytes
from onnxcompress.passes.codebook.fit import (
    CodebookFit,
    fit_binary,
    fit_product,
    fit_scalar,
    fit_ternary,
)
from onnxcompress.passes.codebook.layout import ChannelLayout, channel_axis
from onnxcompress.passes.codebook.pack import PackedIndices
from onnxcompress.passes.codebook.plan import Goal, plan_layers
from onnxcompress.passes.codebook.refine import (
    fit_with_feedback,
    refine_product,
    refit_codewords,
)
from onnxcompress.passes.codebook.sparse import (
    MIN_ZERO_SHARE,
    SPARSE_EXTRA_BYTES,
    SparseEntries,
    encode,
    sparse_bytes,
    zero_share,
)
from onnxcompress.passes.quant.batchnorm import fold_batchnorms
from onnxcompress.progress import Steps

SCHEMES = ("scalar", "pq", "binary", "ternary")
FIXED_BITS = {"binary": 1, "ternary": 2}
DEFAULT_BITS = {"scalar": 4, "pq": 8}
#: data_aware: indices chosen with error feedback up to this width.
FEEDBACK_MAX_BITS = 5
MIN_SIZE = 1024  # default: smaller weights are left alone (biases are vectors anyway)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_CODEBOOK_DTYPES = {"float32": np.float32, "float16": np.float16}


class Codebook(CompressionPass):
    """Float weight W -> Reshape(GatherND(codebook, bit-packed indices)): k-means weight sharing."""

    name = "codebook"

    @dataclass(frozen=True)
    class Config:
        """scheme: scalar (k-means), pq (product quantization), binary (α·sign W), ternary."""

        scheme: str = "scalar"
        # auto granularity: bits per weight on average, codebooks included (4: 8x smaller);
        # otherwise index bits of every layer (k = 2^bits): scalar 4, pq 8; binary 1, ternary 2
        bits: float | None = None
        size: str | None = None  # auto: a file-size target instead, "8x" or "2.5MB"
        # auto: per layer, by measured error per byte (tensor, sorted channel groups, channel
        # or left float); tensor, channel, or group (group_size channels in stored order)
        granularity: str = "auto"
        group_size: int | None = None  # output channels per codebook (granularity=group)
        subvector: int = 4  # pq: sub-vector length d
        init: str = "linear"  # scalar k-means seeds: linear over [min, max] or kmeans++
        codebook_dtype: str = "auto"  # auto (the weight's dtype), float16 or float32
        min_size: int = MIN_SIZE  # weights with fewer values are left alone
        zero_share: float = 0.05  # reserve an exact-zero centroid from this share of zeros
        # how indices are stored: auto (sparse when smaller), dense (every index), or sparse
        # (only non-zero codewords and the advance to each, whenever the zeros allow)
        storage: str = "auto"
        # fold Conv -> BatchNormalization first (exact; onnxruntime fuses them when it loads the
        # model anyway), so the four BN vectors are not stored: 2.5 KB of a 10 KB MNIST CNN
        fold_batchnorm: bool = False
        data_aware: bool = False  # refine codebooks and biases on the calibration data
        ops: tuple[str, ...] = ()  # only weights read by these op types (all when empty)
        exclude: tuple[str, ...] = ()  # weight or node-name glob patterns to leave alone

        def __post_init__(self) -> None:
            check_fields(
                self,
                {
                    "scheme": (lambda v: v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
                    "bits": (lambda v: 1 <= v <= 8, "from 1 to 8"),
                    "granularity": (
                        lambda v: v in ("auto", "tensor", "channel", "group"),
                        "auto, tensor, channel or group",
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
                    "storage": (
                        lambda v: v in ("auto", "dense", "sparse"),
                        "auto, dense or sparse",
                    ),
                },
            )
            fixed = FIXED_BITS.get(self.scheme)
            if fixed is not None and self.bits not in (None, fixed):
                raise ValueError(f"bits={self.bits}: scheme {self.scheme} stores {fixed} bit(s)")
            if (self.granularity == "group") != (self.group_size is not None):
                raise ValueError("group_size goes with granularity=group, and only with it")
            if not self.allocated:
                if self.bits is not None and not float(self.bits).is_integer():
                    raise ValueError(f"bits={self.bits}: an average needs granularity=auto")
                if self.size is not None:
                    raise ValueError("size goes with granularity=auto (scheme scalar)")
            elif self.size is not None:
                target_bytes(self.size, 1)  # a malformed size fails here, before any work
                if self.bits is not None:
                    raise ValueError("give bits (an average) or size, not both")

        @property
        def allocated(self) -> bool:
            """Bits and granularity chosen per layer against a budget."""
            return self.granularity == "auto" and self.scheme == "scalar"

        @property
        def index_bits(self) -> int:
            return int(self.bits or FIXED_BITS.get(self.scheme) or DEFAULT_BITS[self.scheme])

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
        if self.config.fold_batchnorm:
            folded = fold_batchnorms(model, Emitter(model, self.name))
            RemoveUnusedNodesPass()(model)  # the unfolded weights and BN vectors: not the file's
            report.notes.append(f"codebook: folded {folded} BatchNormalization(s) into convs")
        chosen = self._chosen(model, report)
        stats = self._stats(model, chosen, ctx, report)
        plan = {}
        if self.config.allocated:
            goal = Goal(self.config.bits or DEFAULT_BITS["scalar"], self.config.size)
            plan = plan_layers(
                model, chosen, stats, ctx, report, goal, self._codebook_dtype, self.config.storage
            )
        builder = DecoderBuilder(model, self.name)
        steps = Steps(ctx.progress, "codebook: fitting", len(chosen))
        for value in chosen:
            choice = plan.get(value.name)
            try:
                if choice is not None and choice.bits is None:
                    raise Skip("left float: every codebook costs more error than its bytes save")
                layer = self._rewrite(value, builder, stats.get(value.name), ctx.seed, choice)
            except Skip as skip:
                layer = _skipped(value, str(skip))
            report.layers.append(layer)
            steps.done()
        builder.insert_nodes()
        return report

    def _chosen(self, model: ir.Model, report: PassReport) -> list[ir.Value]:
        """The candidate weights this configuration rewrites; the others reported skipped."""
        chosen: list[ir.Value] = []
        for value in [v for v in model.graph.initializers.values() if _is_candidate(v)]:
            try:
                self._check(value)
                chosen.append(value)
            except Skip as skip:
                report.layers.append(_skipped(value, str(skip)))
        return chosen

    def _check(self, value: ir.Value) -> None:
        cfg = self.config
        users = [node for node, _ in value.uses()]
        if value.is_graph_output():
            raise Skip("weight is also a graph output")
        if any(user.graph is not value.graph for user in users):
            raise Skip("weight is read inside a subgraph")
        if value.const_value.size < cfg.min_size:
            raise Skip(f"{value.const_value.size} values < min_size {cfg.min_size}")
        problem = values_problem(weight_array(value))
        if problem:
            raise Skip(problem)
        if cfg.ops and not all(user.op_type in cfg.ops for user in users):
            kinds = ", ".join(sorted({u.op_type for u in users}))
            raise Skip(f"read by {kinds}, not in ops")
        if name_matches(_named(value.name), cfg.exclude) or any(
            name_matches(u, cfg.exclude) for u in users
        ):
            raise Skip("excluded by name pattern")

    def _stats(
        self, model: ir.Model, chosen: list[ir.Value], ctx: PassContext, report: PassReport
    ) -> dict[str, InputStats]:
        """Layer input statistics: for the data-aware fit, and for weighing choices by the
        inputs' second moments (the user's data only: seeded noise says nothing of them)."""
        cfg = self.config
        weighing = cfg.allocated and not ctx.synthetic_calibration
        if not (cfg.data_aware or weighing) or not chosen:
            return {}
        gram = cfg.data_aware and cfg.scheme in ("scalar", "pq")
        stats, notes = collect_stats(model, chosen, ctx.calibration or [], with_gram=gram)
        report.notes.extend(notes)
        return stats

    def _rewrite(
        self,
        value: ir.Value,
        builder: DecoderBuilder,
        stats: InputStats | None,
        seed: int,
        choice: Choice | None,
    ) -> LayerReport:
        """Fit, emit the decoder, move the weight's uses to it, correct the bias."""
        weight = weight_array(value)
        first_user = value.uses()[0].node
        bits = choice.bits if choice is not None else self.config.index_bits
        layout = self._layout(weight, channel_axis(value), choice)
        rows = layout.rows(weight.astype(np.float64))
        fit, order, detail = self._fit(rows, layout, stats, seed, choice)
        approx = layout.weight(self._decoded_rows(fit, rows.shape, order)).astype(weight.dtype)
        sparse = self._sparse_entries(fit, bits, builder.opset)
        decoded = builder.decoder(
            value,
            fit,
            layout,
            bits,
            product=self.config.scheme == "pq",
            codebook_dtype=self._codebook_dtype(weight.dtype),
            order=order,
            sparse=sparse,
        )
        if stats is not None:  # the user's data (or data_aware): the mean shift goes
            detail.update(correct_bias(builder.emitter, value, weight, approx, stats))
        value.replace_all_uses_with(decoded)
        builder.emitter.graph.initializers.pop(value.name)
        detail.update(builder.detail)
        detail.update(
            weight=value.name,
            shape=list(weight.shape),
            codebooks=len(fit.codebook),
            codebook_entries=int(fit.codebook[:, : 1 << bits].size),
        )
        return LayerReport.rewritten(
            first_user,
            detail,
            original=weight,
            restored=approx,
            params=(weight.size, weight.size),  # as many weights as before: each is now an index
            nbytes=(weight.nbytes, builder.stored_bytes),
        )

    def _layout(self, weight: np.ndarray, axis: int | None, choice: Choice | None) -> ChannelLayout:
        """Channel-first rows, or one row when per-channel codebooks would cost more bytes
        than the indices they decode (a handful of weights per channel) and nothing weighed
        the choice."""
        cfg = self.config
        if choice is not None:
            return ChannelLayout(weight.shape, axis)
        if cfg.granularity == "tensor" or cfg.scheme == "pq" or axis is None:
            return ChannelLayout(weight.shape, None if cfg.scheme != "pq" else axis)
        codebooks = weight.shape[axis] // (cfg.group_size or 1)
        itemsize = self._codebook_dtype(weight.dtype).itemsize
        codebook_bytes = codebooks * (1 << cfg.index_bits) * itemsize
        if codebook_bytes > weight.size * cfg.index_bits / 8:
            return ChannelLayout(weight.shape, None, fallback=True)
        return ChannelLayout(weight.shape, axis)

    def _fit(
        self,
        rows: np.ndarray,
        layout: ChannelLayout,
        stats: InputStats | None,
        seed: int,
        choice: Choice | None,
    ) -> tuple[CodebookFit, np.ndarray | None, dict]:
        """The fit, the channel order its rows are in (None: as stored), the report detail."""
        cfg = self.config
        bits = choice.bits if choice is not None else cfg.index_bits
        detail: dict = {"scheme": cfg.scheme, "bits": bits, "granularity": layout.granularity}
        if cfg.scheme == "pq":
            fit, detail = self._fit_product(rows, layout, stats, detail, seed)
            return fit, None, detail
        order = None
        if choice is None:
            groups = self._grouped(rows)
        else:
            groups, order = grouped_rows(rows, choice.groups)
            per_channel = choice.groups == layout.channels > 1
            detail.update(
                granularity="channel" if per_channel else choice.granularity,
                layer_error=float(f"{choice.error:.4g}"),
                predicted_output_error=float(f"{choice.output_error:.4g}"),
            )
        if cfg.scheme == "binary":
            return fit_binary(groups), order, detail
        if cfg.scheme == "ternary":
            return fit_ternary(groups), order, detail
        rng = np.random.default_rng(seed)
        fit = fit_scalar(groups, 1 << bits, cfg.init, cfg.zero_share, rng)
        halves = stats.halves if stats is not None else None
        fc_halves = halves is not None and len(halves[0]) == rows.shape[1]
        if fc_halves and self._keeps_zeros(rows):  # feedback would make its zeros codewords
            ordered = rows if order is None else rows[order]
            fit, before, after = refit_codewords(ordered, fit, halves)
            detail["output_error"] = {"before": round(before, 6), "after": round(after, 6)}
            return fit, order, detail
        # past 5 bits the rounding error is small and 64+ codewords a row cost the most
        if (
            halves is not None
            and bits <= FEEDBACK_MAX_BITS
            and layout.channels > 1
            and len(halves[0]) == rows.shape[1]
        ):
            ordered = rows if order is None else rows[order]
            fit, before, after = fit_with_feedback(ordered, fit, halves)
            detail["output_error"] = {"before": round(before, 6), "after": round(after, 6)}
        return fit, order, detail

    def _keeps_zeros(self, rows: np.ndarray) -> bool:
        """Whether the weight may be stored sparse: its zeros must stay exact zeros."""
        return self.config.storage != "dense" and zero_share(rows) >= MIN_ZERO_SHARE

    def _sparse_entries(self, fit: CodebookFit, bits: int, opset: int) -> SparseEntries | None:
        """The non-zero codewords as sparse entries when stored that way: always with
        ``storage=sparse`` (scalar codewords), with auto when the weight is mostly zeros and
        the entries and their longer decoder take fewer bytes than the dense indices."""
        storage = self.config.storage
        if storage == "dense" or self.config.scheme == "pq":
            return None
        if storage == "auto" and zero_share(fit.decode()) < MIN_ZERO_SHARE:
            return None
        entries = encode(fit, bits)
        if entries is None or storage == "sparse":
            return entries
        dense = PackedIndices.of(fit.indices, bits, opset)
        stored = sparse_bytes(entries.entries, entries.advance_bits, bits) + SPARSE_EXTRA_BYTES
        return entries if stored < stored_nbytes(dense.stored) else None

    def _grouped(self, rows: np.ndarray) -> np.ndarray:
        """Rows [C, L] as one row per codebook: [1, C·L], [C, L] or [C/size, size·L]."""
        size = self.config.group_size
        if rows.shape[0] == 1 or size is None:
            return rows
        if rows.shape[0] % size:
            raise Skip(f"{rows.shape[0]} channels do not split into groups of {size}")
        return rows.reshape(rows.shape[0] // size, -1)

    def _fit_product(
        self,
        rows: np.ndarray,
        layout: ChannelLayout,
        stats: InputStats | None,
        detail: dict,
        seed: int,
    ) -> tuple[CodebookFit, dict]:
        """One codebook of ``subvector``-long codewords per subspace, shared by the channels."""
        dim = self.config.subvector
        channels, length = rows.shape
        if length % dim:
            raise Skip(f"rows of {length} values do not split into sub-vectors of {dim}")
        if channels < 2:
            raise Skip("pq needs output channels to share codewords (no channel axis)")
        vectors = rows.reshape(channels, length // dim, dim).transpose(1, 0, 2)
        fit = fit_product(vectors, 1 << self.config.index_bits, seed=seed)
        detail.update(granularity="subspace", subvector=dim, subspaces=length // dim)
        gram = stats.gram if stats is not None else None
        if gram is not None and layout.fc_rows:
            fit, before, after = refine_product(vectors, fit, gram)
            detail["output_error"] = {"before": round(before, 6), "after": round(after, 6)}
        return fit, detail

    def _decoded_rows(
        self, fit: CodebookFit, shape: tuple[int, int], order: np.ndarray | None
    ) -> np.ndarray:
        """The approximated rows [C, L], as the decoder graph will compute them."""
        if self.config.scheme == "pq":
            return fit.product_rows()
        return ungrouped(fit.decode(), order, shape)

    def _codebook_dtype(self, weight_dtype: np.dtype) -> np.dtype:
        choice = self.config.codebook_dtype
        return np.dtype(weight_dtype if choice == "auto" else _CODEBOOK_DTYPES[choice])


def _is_candidate(value: ir.Value) -> bool:
    """A constant float tensor with at least two non-trivial axes (vectors are biases/scales)."""
    tensor = value.const_value
    if tensor is None or tensor.dtype not in _FLOAT_TYPES or value.is_graph_input():
        return False
    return sum(1 for size in tensor.shape if size > 1) >= 2 and bool(value.uses())


def _named(name: str) -> ir.Node:
    """A stand-in node so weight names match the same glob patterns as node names."""
    stand_in = ir.Node("", "Identity", [])
    stand_in.name = name
    return stand_in


def _skipped(value: ir.Value, reason: str) -> LayerReport:
    users = [node for node, _ in value.uses()]
    if not users:
        label = value.name or "?"
        return LayerReport(node=label, op_type="initializer", action="skipped", reason=reason)
    report = LayerReport.skipped(users[0], reason)
    report.detail = {"weight": value.name}
    return report
