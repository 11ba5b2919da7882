"""The decoder graphs of the codebook pass: stored indices and codebooks in, the weight out.

Per weight: unpack the indices (``pack.py`` documents the layouts) to int64 ``[G, M, 1]``,
GatherND them from the codebooks ``[G, K, d]`` (batch_dims=1: one codebook per row), then
reshape (and transpose) back to the weight's shape. Every input is an initializer, so
onnxruntime folds the decoder at session creation and runs the model at full speed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxcompress.emit import Emitter
from onnxcompress.graph import default_opset
from onnxcompress.passes.codebook.fit import CodebookFit
from onnxcompress.passes.codebook.layout import ChannelLayout
from onnxcompress.passes.codebook.pack import (
    PackedIndices,
    field_modulus,
    field_shifts,
    plane_powers,
)
from onnxcompress.passes.codebook.sparse import SparseEntries

#: BitShift (11), GatherND with batch_dims (12), ReduceSum with axes as an input (13).
DECODE_OPSET = 13
_SHARED_BASE = "cb"  # small constants every decoder reads (short: named in every reader)


class DecoderBuilder:
    """Emits the decoder of one weight after another, and counts the bytes each stores.

    Constants are named ``{weight}.codebook.{kind}``, the decoded weight ``{weight}.decoded``;
    the nodes between are tagged with the pass and left unnamed (``_op``). Small constants
    that every decoder of the same layout reads (shifts, moduli, axes) are made once per model
    and counted where first made."""

    def __init__(self, model: ir.Model, pass_name: str) -> None:
        self.emitter = Emitter(model, pass_name)
        self.opset = default_opset(model) or DECODE_OPSET
        self.nodes: list[ir.Node] = []
        self.stored_bytes = 0  # of the current weight
        self.detail: dict = {}  # of the current weight: bytes per kind, index layout
        self._shared: dict[tuple, ir.Value] = {}
        self._base = ""
        self._made = 0  # decoder nodes made: their outputs are numbered

    def decoder(
        self,
        weight: ir.Value,
        fit: CodebookFit,
        layout: ChannelLayout,
        bits: int,
        *,
        product: bool,
        codebook_dtype: np.dtype,
        order: np.ndarray | None = None,
        sparse: SparseEntries | None = None,
    ) -> ir.Value:
        """The decoded replacement for ``weight`` (whose uses the caller moves to it).

        ``product``: the rows of ``fit`` are subspaces (product quantization), transposed
        back to channels after the gather. ``order``: the rows hold the channels in this
        order (channels of similar range sharing a codebook), put back by a Gather.
        ``sparse``: the non-zero codewords stored as entries (``sparse.py``), not every index."""
        self._base, self.stored_bytes, self.detail = weight.name, 0, {}
        if sparse is not None:
            gathered = self._scattered(fit, bits, sparse, np.dtype(codebook_dtype))
        else:
            packed = PackedIndices.of(fit.indices, bits, self.opset)
            indices = self._indices(packed, flat=product)
            table = self._stored("codebook", fit.codebook[:, : 1 << bits].astype(codebook_dtype))
            gathered = self._op("GatherND", [table, indices], batch_dims=1)  # [G, count, d]
            self.detail["layout"] = packed.layout
        if product:
            gathered = self._op("Transpose", [gathered], perm=[1, 0, 2])
        if order is not None:
            gathered = self._reordered(gathered, order, layout.channels)
        decoded = self._reshaped(gathered, layout)
        if np.dtype(codebook_dtype) != weight.const_value.dtype.numpy():
            decoded = self._op("Cast", [decoded], to=weight.const_value.dtype)
        decoded.name = self.emitter.namer.fresh(f"{self._base}.decoded")
        return decoded

    def insert_nodes(self) -> None:
        """Decoders read only initializers, so they go first in the graph (still sorted)."""
        self.emitter.prepend(self.nodes)

    def _indices(self, packed: PackedIndices, flat: bool) -> ir.Value:
        """int64 indices shaped ``[G, ..., 1]`` (``[G, count, 1]`` if padded or ``flat``)."""
        stored = self._stored("indices", packed.stored)
        unpacked = self._unpacked(stored, packed)
        if packed.layout in ("uint8", "uint4") or (packed.padded == packed.count and not flat):
            return unpacked
        shape = self._constant("shape", np.array([packed.groups, packed.padded, 1], np.int64))
        rows = self._op("Reshape", [unpacked, shape])
        return rows if packed.padded == packed.count else self._first(rows, packed.count, 1)

    def _unpacked(self, stored: ir.Value, packed: PackedIndices) -> ir.Value:
        """The stored values as int64: a Cast for whole bytes and UINT4, else the fields."""
        if packed.layout in ("uint8", "uint4"):
            return self._op("Cast", [stored], to=ir.DataType.INT64)
        return self._unpacked_fields(stored, packed.bits, packed.layout)

    def _first(self, value: ir.Value, count: int, axis: int) -> ir.Value:
        """The first ``count`` values along ``axis`` (packing pads each row to whole bytes)."""
        starts = self._shared_constant("zero", np.array([0], np.int64))
        ends = self._constant("count", np.array([count], np.int64))
        axes = self._shared_constant(f"axis{axis}", np.array([axis], np.int64))
        return self._op("Slice", [value, starts, ends, axes])

    def _scattered(
        self, fit: CodebookFit, bits: int, sparse: SparseEntries, dtype: np.dtype
    ) -> ir.Value:
        """The rows ``[G·M]`` flat: zeros, with each entry's codeword scattered to its
        position (the running sum of the advances). Codebook row g starts at g·K in the
        stored table."""
        size = self._constant("size", np.array([sparse.size], np.int64))
        zeros = self._op("ConstantOfShape", [size], value=ir.tensor(np.zeros(1, dtype)))
        self.detail.update(
            storage="sparse",
            entries=sparse.entries,
            fillers=sparse.fillers,
            advance_bits=sparse.advance_bits,
        )
        if sparse.entries == 0:
            return zeros
        fields = self._stream("entries", sparse.fields(), sparse.width)
        # the one stored stream, split by bits into what locates and what names the weights
        stored = self.detail["entries_bytes"]
        positions = round(stored * sparse.advance_bits / sparse.width)
        self.detail.update(positions_bytes=positions, indices_bytes=stored - positions)
        width = self._shared_constant(f"width{bits}", np.array(1 << bits, np.int64))
        indices = self._op("Mod", [fields, width])
        axis = self._shared_constant("axis", np.array(0, np.int64))  # CumSum takes a scalar
        positions = self._op("CumSum", [self._op("Div", [fields, width]), axis])
        groups, length = fit.indices.shape
        if groups > 1:  # each position's codebook row, as an offset into the flat table
            row_length = self._constant("row_length", np.array(length, np.int64))
            rows = self._op("Div", [positions, row_length])
            indices = self._op("Add", [indices, self._op("Mul", [rows, width])])
        table = fit.codebook[:, : 1 << bits, 0].reshape(-1).astype(dtype)
        values = self._op("Gather", [self._stored("codebook", table), indices], axis=0)
        return self._op("ScatterElements", [zeros, positions, values], axis=0)

    def _stream(self, kind: str, values: np.ndarray, bits: int) -> ir.Value:
        """A flat run of ``bits``-bit values, packed as one row and unpacked to int64 [n]."""
        packed = PackedIndices.of(np.asarray(values)[None], bits, self.opset)
        stored = self._stored(kind, packed.stored)
        self.detail[f"{kind}_layout"] = packed.layout
        flat_shape = self._shared_constant("flat", np.array([-1], np.int64))
        flat = self._op("Reshape", [self._unpacked(stored, packed), flat_shape])
        return flat if packed.padded == packed.count else self._first(flat, packed.count, 0)

    def _unpacked_fields(self, stored: ir.Value, bits: int, layout: str) -> ir.Value:
        """The bit fields (or bit planes, summed) of the packed bytes, as int64."""
        shifts = self._shared_constant("shifts", field_shifts(bits, layout))
        modulus = self._shared_constant("modulus", np.uint8(field_modulus(bits, layout)))
        shifted = self._op("BitShift", [stored, shifts], direction="RIGHT")
        fields = self._op("Mod", [shifted, modulus])
        if layout != "planes":
            return self._op("Cast", [fields], to=ir.DataType.INT64)
        # Planes are weighed and summed in int32 (ReduceSum takes no uint8), then cast once:
        # onnxruntime keeps every folded value until the session starts, and int64 planes
        # took 16 bytes a weight per bit.
        powers = self._shared_constant("powers", plane_powers(bits).astype(np.int32))
        planes = self._op("Cast", [fields], to=ir.DataType.INT32)
        weighted = self._op("Mul", [planes, powers])
        axis = self._shared_constant("axis0", np.array([0], np.int64))
        summed = self._op("ReduceSum", [weighted, axis], keepdims=0)
        return self._op("Cast", [summed], to=ir.DataType.INT64)

    def _reordered(self, gathered: ir.Value, order: np.ndarray, channels: int) -> ir.Value:
        """Channel rows ``[C, L]`` back in stored order: row c is row ``position[c]``."""
        position = np.empty(channels, np.uint8 if channels <= 256 else np.uint16)
        position[order] = np.arange(channels)
        shape = self._constant("rows", np.array([channels, -1], np.int64))
        rows = self._op("Reshape", [gathered, shape])
        stored = self._stored("order", position)
        index = self._op("Cast", [stored], to=ir.DataType.INT64)
        return self._op("Gather", [rows, index], axis=0)

    def _reshaped(self, gathered: ir.Value, layout: ChannelLayout) -> ir.Value:
        """The gathered rows back in the weight's shape and axis order."""
        shape = self._constant("shape", np.array(layout.channel_first_shape, np.int64))
        decoded = self._op("Reshape", [gathered, shape])
        if layout.transposed:
            perm = [int(i) for i in np.argsort(layout.perm)]
            decoded = self._op("Transpose", [decoded], perm=perm)
        return decoded

    def _stored(self, kind: str, array: np.ndarray) -> ir.Value:
        """A constant that holds the weight's information (indices, codebooks), reported
        as ``{kind}_bytes``."""
        self.detail[f"{kind}_bytes"] = stored_nbytes(array)
        return self._constant(kind, array)

    def _constant(self, kind: str, array: np.ndarray) -> ir.Value:
        self.stored_bytes += stored_nbytes(array)
        return self.emitter.constant(f"{self._base}.codebook.{kind}", array)

    def _shared_constant(self, kind: str, array: np.ndarray) -> ir.Value:
        """One initializer per distinct small array in the model (counted where first made)."""
        array = np.asarray(array)
        key = (kind, array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            self.stored_bytes += stored_nbytes(array)
            self._shared[key] = self.emitter.constant(f"{_SHARED_BASE}.{kind}", array)
        return self._shared[key]

    def _op(self, op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        """A decoder node (inserted later, with all the others), and its output.

        Decoder nodes are tagged with the pass, and they and their outputs get short names
        (``cb12``): a value's name is stored with every node that makes or reads it, and
        weight-long names took ~100 bytes a node, 9.5 KB of a 59 KB sparse MLP (unnamed nodes
        get onnx_ir's ``node_ScatterElements_13`` on saving)."""
        node = self.emitter.node(op_type, inputs, attributes)
        self._made += 1
        node.outputs[0].name = self.emitter.namer.fresh(f"cb{self._made}")
        node.name = node.outputs[0].name
        self.nodes.append(node)
        return node.outputs[0]


def stored_nbytes(array: np.ndarray) -> int:
    """Bytes as stored in the ONNX file (4-bit types pack two values a byte)."""
    array = np.asarray(array)
    if array.dtype.itemsize == 1 and "int4" in array.dtype.name:
        return math.ceil(array.size / 2)
    return int(array.nbytes)
