"""Sub-byte index storage for the codebook pass: pack (and, to check, unpack) in numpy; the
decoder graph (``decoder.py``) unpacks with the same steps.

Layouts, for indices ``[G, M]`` of ``bits`` each (all decoded with standard ops that
onnxruntime constant-folds at session creation):

- ``uint8``: 8 bits, one byte per index, nothing to unpack.
- ``uint4``: 4 bits as ONNX's own UINT4 type (opset 21+), unpacked by a Cast.
- ``fields``: 1, 2 or 4 bits, ``8 / bits`` indices per byte, lowest bits first; unpacked by
  BitShift right by (0, bits, 2·bits, …) then Mod 2^bits.
- ``planes``: 3, 5, 6 or 7 bits (or 9-16: sparse storage's fields, ``sparse.py``) as
  ``bits`` bit planes, 8 indices per byte in each plane; unpacked by BitShift + Mod 2, then
  Σ plane·2^p (ReduceSum).

Each row is padded to whole bytes; the decoder slices the padding off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: ONNX's 4-bit integer types (and onnxruntime's Cast from them) start at opset 21.
UINT4_OPSET = 21


def layout_for(bits: int, opset: int) -> str:
    """The storage layout of ``bits``-bit indices in a model of default-domain ``opset``."""
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
    indices = np.asarray(indices, np.uint8 if bits <= 8 else np.uint16)
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


def field_modulus(bits: int, layout: str) -> int:
    """What each shifted-down field is reduced modulo: 2^bits, or 2 for one bit plane."""
    return (1 << bits) if layout == "fields" else 2


def plane_powers(bits: int) -> np.ndarray:
    """2^p for bit plane p, shaped to weigh the planes axis of an unpacked ``planes`` store."""
    return (1 << np.arange(bits, dtype=np.int64)).reshape(bits, 1, 1, 1, 1)


def unpack(stored: np.ndarray, bits: int, layout: str, count: int) -> np.ndarray:
    """Inverse of :func:`pack` in numpy, the same steps as the decoder graph: ``[G, count]``."""
    if layout in ("uint8", "uint4"):
        return np.asarray(stored[:, :, 0], np.uint8)
    values = (stored >> field_shifts(bits, layout)) % field_modulus(bits, layout)
    if layout == "planes":
        values = (values.astype(np.int64) * plane_powers(bits)).sum(0)
    return values.reshape(values.shape[0], -1)[:, :count].astype(
        np.uint8 if bits <= 8 else np.uint16
    )


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


@dataclass(frozen=True)
class PackedIndices:
    """Indices ``[groups, count]`` of ``bits`` each, as stored in ``layout``."""

    stored: np.ndarray
    bits: int
    layout: str
    groups: int
    count: int

    @classmethod
    def of(cls, indices: np.ndarray, bits: int, opset: int) -> PackedIndices:
        """``indices`` packed in the layout that a model of ``opset`` can decode."""
        layout = layout_for(bits, opset)
        groups, count = indices.shape
        return cls(pack(indices, bits, layout), bits, layout, groups, count)

    @property
    def padded(self) -> int:
        """Indices per row in the stored form, padding included."""
        return padded_count(self.stored.shape, self.bits, self.layout)

    def unpack(self) -> np.ndarray:
        return unpack(self.stored, self.bits, self.layout, self.count)
