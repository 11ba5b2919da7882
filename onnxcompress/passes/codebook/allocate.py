"""Per-layer codebook granularity and bits chosen by measured error under a byte budget.

Every weight is weighed at each index width (1-8 bits) and each granularity: one codebook for
the tensor, one per output channel, or one per group of channels of similar range (the
channels sorted by their largest magnitude and cut into equal groups; the decoder puts them
back in order). Leaving the weight float is a choice too. A choice costs the bytes it stores
(indices, codebooks, the channel order) and the layer the relative output error it causes:
Σ E[x²]·(W − Ŵ)² / Σ E[x²]·W², the weight error scaled by the second moment of the input each
weight multiplies (from the calibration data; uniform without data).

The layers' relative errors add up to the network's to first order, so the budget goes where
an error falls most per byte: each layer takes the choice that minimizes error + λ·bytes,
with λ the smallest price at which the whole fits the budget. A byte-only rule (per-channel
codebooks unless they outweigh the indices) sent the small-fan-in layers of mobile networks
(1×1 expansions with 16 inputs, 3×3 depthwise with 9) to one codebook per tensor and
destroyed them; here a layer pays for finer codebooks whenever they buy more than bits do.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from onnxcompress.passes.codebook.fit import RowQuantizer
from onnxcompress.passes.codebook.sparse import (
    SPARSE_EXTRA_BYTES,
    advances_of,
    cheapest_advance_bits,
    sparse_bytes,
)

BITS = range(1, 9)
#: A choice that loses more of the layer's output than this is not weighed: errors add up
#: through the network only while they are small (the gains are measured at 3 bits, about
#: 0.035), and a 1-bit codebook (0.36) on the first layer of an MLP cost it 3 points of
#: accuracy that its measured gain put at nothing. 2-bit codebooks (about 0.12) stay.
MAX_LAYER_ERROR = 0.15
#: Larger weights are weighed on this many values: a sample of the columns of every row (the
#: sorted copies, prefix sums and orders of weighing take about 60 bytes a value).
MEASURED_VALUES = 1 << 21


#: What one decoder node takes in a saved file: its op type, short node and value names
#: (``cb12``), the pass tag and attributes (about 85 bytes with the constants it reads).
NODE_BYTES = 85
#: Decoder nodes of a weight, about: dense 5-8 (more for odd widths, which sum bit planes).
DENSE_NODES = 8


def decoder_overhead(name: str, nodes: int = DENSE_NODES) -> int:
    """Bytes a weight's decoder adds to a file besides its indices and codebooks: its nodes,
    and some four constants of its own (shapes, counts), each named after the weight and
    read by name (1.1-1.9 KB a weight on ppocrv4_det and ultraface with the old weight-long
    node names; 0.55-0.9 KB measured now for a dense decoder, 1.5-1.7 KB for a sparse one)."""
    return nodes * NODE_BYTES + 4 * (2 * len(name.encode()) + 30)


@dataclass(frozen=True)
class Choice:
    """How one weight is stored: ``bits`` per index (None: left float) and ``groups``
    codebooks (1: the tensor; the channel count: one per channel)."""

    bits: int | None
    groups: int
    nbytes: int
    error: float  # the layer's relative output error
    output_error: float | None = None  # the error it predicts at the model's outputs

    @property
    def granularity(self) -> str:
        if self.bits is None:
            return "float"
        return {1: "tensor"}.get(self.groups, f"{self.groups} groups")


@dataclass
class LayerChoices:
    """The choices measured for one weight; ``gain`` scales a choice's layer error to the
    model's output error (``sensitivity.py``)."""

    name: str
    choices: list[Choice]
    gain: float = 1.0

    def cost(self, choice: Choice) -> float:
        return self.gain * choice.error


def measure_choices(
    name: str,
    rows: np.ndarray,
    importance: np.ndarray | None,
    itemsize: int,
    float_bytes: int | None = None,
    bits: range = BITS,
    overhead: int = 0,
) -> LayerChoices:
    """Every (bits, granularity) of the weight ``rows`` ``[C, L]`` with its bytes and error,
    codebooks of ``itemsize`` bytes an entry; and leaving it float (``float_bytes``), if given.
    Every codebook choice also costs ``overhead`` bytes (its decoder, for a file-size goal).

    ``importance`` (broadcastable to ``rows``) is E[x²] of the input each weight multiplies."""
    channels, shape = len(rows), rows.shape
    choices = [] if float_bytes is None else [Choice(None, 0, float_bytes, 0.0)]
    full = None if importance is None else np.broadcast_to(importance, rows.shape)
    if rows.size > MEASURED_VALUES:  # errors from a sample of every row's columns
        keep = max(1, MEASURED_VALUES // channels)
        columns = np.sort(np.random.default_rng(0).choice(shape[1], keep, replace=False))
        rows = rows[:, columns]
        full = None if full is None else full[:, columns]
    energy = float(np.sum(rows * rows * (1.0 if full is None else full))) or 1.0
    for groups in group_counts(channels):
        grouped, order = grouped_rows(rows, groups)
        weights = None if full is None else grouped_rows(full, groups, order)[0]
        quantizer = RowQuantizer(grouped)  # weighting the fit by E[x²] measured worse
        for b in bits:
            nbytes = stored_bytes(shape, groups, b, itemsize) + overhead
            if float_bytes is not None and nbytes >= float_bytes:
                break  # float is exact for fewer bytes (and wider codebooks cost more)
            if groups > 1 and 2 * groups * (1 << b) * itemsize > nbytes:
                break  # codebooks outweigh indices: fewer codebooks do better (and cost less)
            error = quantizer.squared_error(1 << b, weights) / energy
            if error <= MAX_LAYER_ERROR:
                choices.append(Choice(b, groups, nbytes, error))
    return LayerChoices(name, choices)


def measure_sparse_choices(
    name: str,
    rows: np.ndarray,
    importance: np.ndarray | None,
    itemsize: int,
    float_bytes: int | None = None,
    always_sparse: bool = False,
    bits: range = BITS,
    overhead: int = 0,
) -> LayerChoices:
    """The choices of a mostly-zero weight: one codebook for the tensor whose first codeword
    is an exact zero (the zeros stay zeros, the other ``2^b - 1`` codewords fit the non-zeros),
    stored sparse (advances and indices of the non-zeros, ``sparse.py``) or dense, whichever is
    smaller (sparse only when ``always_sparse``), each costing ``overhead`` bytes more (its
    decoder; the sparse one's ``SPARSE_EXTRA_BYTES`` more still). Per-channel codebooks are
    not weighed: a channel keeps a few non-zeros, fewer than its codebook would hold."""
    values = rows.ravel()
    nonzero = values != 0
    kept = values[nonzero]
    weights = None if importance is None else np.broadcast_to(importance, rows.shape).ravel()
    weights = None if weights is None else weights[nonzero]
    if kept.size > MEASURED_VALUES:  # errors from a sample of the non-zeros
        sample = np.sort(np.random.default_rng(0).choice(kept.size, MEASURED_VALUES, False))
        kept, weights = kept[sample], None if weights is None else weights[sample]
    energy = float(np.sum(kept * kept * (1.0 if weights is None else weights))) or 1.0
    quantizer = RowQuantizer(kept[None]) if kept.size else None
    advances = advances_of(nonzero)
    choices = [] if float_bytes is None else [Choice(None, 0, float_bytes, 0.0)]
    for b in bits:
        advance_bits, entries = cheapest_advance_bits(advances, b)
        sparse = sparse_bytes(entries, advance_bits, b) + (1 << b) * itemsize
        nbytes = sparse + SPARSE_EXTRA_BYTES + overhead
        if not always_sparse:
            nbytes = min(nbytes, stored_bytes(rows.shape, 1, b, itemsize) + overhead)
        if float_bytes is not None and nbytes >= float_bytes:
            break
        error = 0.0
        if quantizer is not None:
            error = quantizer.squared_error((1 << b) - 1, weights) / energy
        if error <= MAX_LAYER_ERROR:
            choices.append(Choice(b, 1, nbytes, error))
    return LayerChoices(name, choices)


def weighted_error(rows: np.ndarray, approx: np.ndarray, importance: np.ndarray | None) -> float:
    """Σ E[x²]·(W − Ŵ)² / Σ E[x²]·W²: the layer's relative output error, inputs taken as
    uncorrelated (plain relative weight error without ``importance``)."""
    diff = np.square(rows - approx)
    energy = np.square(rows)
    if importance is not None:
        diff, energy = diff * importance, energy * importance
    total = float(energy.sum())
    return float(diff.sum()) / total if total > 0 else 0.0


def group_counts(channels: int) -> list[int]:
    """1, the powers of four that divide ``channels`` evenly, and ``channels``."""
    counts = [1]
    size = 4
    while size < channels:
        if channels % size == 0:
            counts.append(size)
        size *= 4
    if channels > 1:
        counts.append(channels)
    return counts


def channel_order(rows: np.ndarray, groups: int) -> np.ndarray | None:
    """The channel order that puts channels of similar range together (None: as stored)."""
    if groups in (1, len(rows)):
        return None
    return np.argsort(np.abs(rows).max(axis=1), kind="stable")


def grouped_rows(
    rows: np.ndarray, groups: int, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``rows`` ``[C, L]`` as one row per codebook, ``[groups, C·L / groups]``, and the
    channel order used (None when the channels keep their stored order); ``order`` given:
    laid out in that order (to lay out a companion of the weight the same way)."""
    order = channel_order(rows, groups) if order is None else order
    ordered = rows if order is None else rows[order]
    return ordered.reshape(groups, -1), order


def ungrouped(grouped: np.ndarray, order: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of ``grouped_rows``."""
    rows = grouped.reshape(shape)
    if order is None:
        return rows
    restored = np.empty_like(rows)
    restored[order] = rows
    return restored


def stored_bytes(shape: tuple[int, int], groups: int, bits: int, itemsize: int) -> int:
    """Indices (each row padded to whole bytes), codebooks and, for sorted groups, the channel
    order (one byte per channel up to 256 channels, two above)."""
    channels, length = shape
    per_row = channels * length // groups
    indices = groups * math.ceil(per_row * bits / 8)
    codebooks = groups * (1 << bits) * itemsize
    order = channels * (1 if channels <= 256 else 2) if 1 < groups < channels else 0
    return indices + codebooks + order


def allocate(layers: list[LayerChoices], budget: float) -> tuple[dict[str, Choice], bool]:
    """Per layer, the choice minimizing gain·error + λ·bytes for the smallest λ whose choices fit
    ``budget`` bytes in all; and whether they fit (False: the smallest choice of each)."""

    def pick(price: float) -> dict[str, Choice]:
        def priced(layer: LayerChoices, choice: Choice) -> tuple[float, int]:
            return layer.cost(choice) + price * choice.nbytes, choice.nbytes

        return {
            layer.name: min(layer.choices, key=functools.partial(priced, layer)) for layer in layers
        }

    def total(chosen: dict[str, Choice]) -> int:
        return sum(choice.nbytes for choice in chosen.values())

    free = pick(0.0)
    if total(free) <= budget:
        return free, True
    low, high = 1e-15, 1.0
    while total(pick(high)) > budget and high < 1e6:
        high *= 100
    if total(pick(high)) > budget:
        return pick(high), False
    for _ in range(60):  # bisection on log λ
        middle = math.sqrt(low * high)
        low, high = (middle, high) if total(pick(middle)) > budget else (low, middle)
    return _spend_rest(layers, pick(high), budget), True


def _spend_rest(layers: list[LayerChoices], chosen: dict[str, Choice], budget: float):
    """What a price leaves unspent (the choices are steps, not a curve) buys the upgrades
    that remove the most error per byte, one at a time while they fit."""
    left = budget - sum(choice.nbytes for choice in chosen.values())
    while True:
        best, best_rate = None, 0.0
        for layer in layers:
            current = chosen[layer.name]
            for choice in layer.choices:
                extra = choice.nbytes - current.nbytes
                gain = layer.cost(current) - layer.cost(choice)
                if 0 < extra <= left and gain > 0 and gain / extra > best_rate:
                    best, best_rate = (layer.name, choice, extra), gain / extra
        if best is None:
            return chosen
        name, choice, extra = best
        chosen[name] = choice
        left -= extra


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(x|b|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def target_bytes(size: str, original: int) -> float:
    """``size`` as bytes: "8x" (the original over 8), "2.5MB", "900kb" or a byte count."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size={size!r}: must be a ratio such as 8x or a size such as 2.5MB")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    if unit == "x":
        if number < 1:
            raise ValueError(f"size={size!r}: a ratio must be at least 1x")
        return original / number
    return number * _UNITS[unit]
