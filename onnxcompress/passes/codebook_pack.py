"""Sub-byte index storage for the codebook pass: pack in numpy, unpack in the ONNX graph.

Layouts, for indices ``[G, M]`` of ``bits`` each (all decoded with standard ops that
onnxruntime constant-folds at session creation):

- ``uint8``: 8 bits, one byte per index, nothing to unpack.
- ``uint4``: 4 bits as ONNX's own UINT4 type (opset 21+), unpacked by a Cast.
- ``fields``: 1, 2 or 4 bits, ``8 / bits`` indices per byte, lowest bits first; unpacked by
  BitShift right by (0, bits, 2·bits, …) then Mod 2^bits.
- ``planes``: 3, 5, 6 or 7 bits as ``bits`` bit planes, 8 indices per byte in each plane;
  unpacked by BitShift + Mod 2, then Σ plane·2^p (ReduceSum).

Each row is padded to whole bytes; the decoder slices the padding off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

#: ONNX's 4-bit integer types (and onnxruntime's Cast from them) start at opset 21.
UINT4_OPSET = 21


def layout_for(bits: int, opset: int) -> str:
    if bits == 8:
        return "uint8"
    if bits == 4 and opset >= UINT4_OPSET:
        return "uint4"
    return "fields" if 8 % bits == 0 else "planes"


def pack(indices: np.ndarray, bits: int, layout: str) -> np.ndarray:
    """Stored form of ``indices`` ``[G, M]`` (values < 2^bits) in ``layout``.

    Shapes are chosen so the decoder needs no reshaping: unpacking broadcasts a trailing
    ``[n, 1]`` axis pair into the ``[..., 1]`` index tuples GatherND reads.
    """
    indices = np.asarray(indices, np.uint8)
    if layout == "uint8":
        return indices[:, :, None]
    if layout == "uint4":
        import ml_dtypes  # onnx_ir's own dependency: numpy's view of 4-bit types

        return indices.astype(ml_dtypes.uint4)[:, :, None]
    if layout == "fields":
        per_byte = 8 // bits
        fields = _pad(indices, per_byte).reshape(len(indices), -1, per_byte)
        shifts = np.arange(per_byte, dtype=np.uint8) * bits
        packed = np.bitwise_or.reduce(fields << shifts, axis=2).astype(np.uint8)
        return packed[:, :, None, None]  # [G, B, 1, 1]
    planes = (_pad(indices, 8)[None] >> np.arange(bits, dtype=np.uint8)[:, None, None]) & 1
    bits_in_bytes = planes.reshape(bits, len(indices), -1, 8) << np.arange(8, dtype=np.uint8)
    packed = np.bitwise_or.reduce(bits_in_bytes, axis=3).astype(np.uint8)
    return packed[..., None, None]  # [bits, G, B, 1, 1]


def field_shifts(bits: int, layout: str) -> np.ndarray:
    """Right shifts that bring each field of a byte down, shaped ``[fields, 1]``."""
    step = bits if layout == "fields" else 1
    return (np.arange(8 // step, dtype=np.uint8) * step)[:, None]


def unpack(stored: np.ndarray, bits: int, layout: str, count: int) -> np.ndarray:
    """Inverse of :func:`pack` in numpy, the same steps as the decoder graph: ``[G, count]``."""
    if layout in ("uint8", "uint4"):
        return np.asarray(stored[:, :, 0], np.uint8)
    modulus = (1 << bits) if layout == "fields" else 2
    values = (stored >> field_shifts(bits, layout)) % modulus
    if layout == "planes":
        powers = (1 << np.arange(bits, dtype=np.int64)).reshape(bits, 1, 1, 1, 1)
        values = (values.astype(np.int64) * powers).sum(0)
    return values.reshape(values.shape[0], -1)[:, :count].astype(np.uint8)


def padded_count(stored_shape: tuple[int, ...], bits: int, layout: str) -> int:
    """How many indices per row the stored form holds, padding included."""
    if layout in ("uint8", "uint4"):
        return stored_shape[1]
    if layout == "fields":
        return stored_shape[1] * (8 // bits)
    return stored_shape[2] * 8


def _pad(indices: np.ndarray, multiple: int) -> np.ndarray:
    extra = -indices.shape[1] % multiple
    return np.pad(indices, ((0, 0), (0, extra))) if extra else indices


@dataclass
class Decoder:
    """Builds the nodes that turn stored indices into int64 ``[G, M, 1]`` for GatherND."""

    graph_nodes: list[ir.Node]
    new_constant: Callable[[str, np.ndarray], ir.Value]  # registers an initializer
    shared_constant: Callable[
        [str, np.ndarray], ir.Value
    ]  # same, but one initializer per distinct array in the model

    def indices(
        self, stored: ir.Value, bits: int, layout: str, rows: int, count: int, flat: bool
    ) -> ir.Value:
        """int64 indices shaped ``[G, ..., 1]`` (``[G, count, 1]`` if padded or ``flat``)."""
        if layout in ("uint8", "uint4"):
            return self._op("Cast", [stored], to=ir.DataType.INT64)
        shifts = self.shared_constant("shifts", field_shifts(bits, layout))
        modulus = np.uint8((1 << bits) if layout == "fields" else 2)
        shifted = self._op("BitShift", [stored, shifts], direction="RIGHT")
        fields = self._op("Mod", [shifted, self.shared_constant("modulus", modulus)])
        unpacked = self._op("Cast", [fields], to=ir.DataType.INT64)
        if layout == "planes":
            powers = (1 << np.arange(bits, dtype=np.int64)).reshape(bits, 1, 1, 1, 1)
            weighted = self._op("Mul", [unpacked, self.shared_constant("powers", powers)])
            axis = self.shared_constant("axis0", np.array([0], np.int64))
            unpacked = self._op("ReduceSum", [weighted, axis], keepdims=0)
        padded = padded_count(tuple(stored.shape), bits, layout)
        if padded == count and not flat:
            return unpacked
        shape = self.new_constant("shape", np.array([rows, padded, 1], np.int64))
        rows_of_indices = self._op("Reshape", [unpacked, shape])
        if padded == count:
            return rows_of_indices
        starts = self.shared_constant("zero", np.array([0], np.int64))
        ends = self.new_constant("count", np.array([count], np.int64))
        axes = self.shared_constant("axis1", np.array([1], np.int64))
        return self._op("Slice", [rows_of_indices, starts, ends, axes])

    def _op(self, op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes)
        self.graph_nodes.append(node)
        return node.outputs[0]
