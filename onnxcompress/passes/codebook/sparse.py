"""Sparse storage for the codebook pass (Deep Compression's layout): only the weights whose
codeword is not zero are stored, each as one bit field holding its *advance* (the distance
from the entry before it, from position 0 for the first) and its codebook index.

Advances are stored at a fixed width chosen per weight; one too long for it is bridged by
*filler* entries, which advance the most the width holds and land on a zero of the run, so they
carry that zero's index and decode to the zero already there. Field = advance·2^b + index, packed
like dense indices (``pack.py``; widths above 8 bits as bit planes). The decoder
(``decoder.py``) takes the index as the field mod 2^b, the position as the running sum of the
advances, and scatters the gathered codewords into zeros; every input is a constant, so
onnxruntime folds it all at session creation, as it does the dense form.

Positions run over the weight's codebook rows ``[G, M]`` flattened row-major; the row of a
position (its codebook, when there are several) is ``position // M``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxcompress.passes.codebook.fit import CodebookFit

ADVANCE_BITS = range(1, 9)
#: Weights with a smaller share of exact zeros are never stored sparse: an advance and an
#: index per non-zero cost more than a dense index per weight below about half zeros.
MIN_ZERO_SHARE = 0.5
#: What the sparse decoder adds to a file over the dense one: some seven more nodes (the
#: running sum, the scatter into zeros) and three constants; measured 1.6 KB against 0.7 KB
#: for a 4-bit weight, 0.9 KB for a 3-bit one (bit planes).
SPARSE_EXTRA_BYTES = 900


def zero_share(values: np.ndarray) -> float:
    """The share of exact zeros in ``values``."""
    values = np.asarray(values)
    return float(np.count_nonzero(values == 0)) / max(values.size, 1)


def advances_of(nonzero: np.ndarray) -> np.ndarray:
    """The advance of each non-zero of the flat boolean ``nonzero`` (int64): its position for
    the first, the distance from the one before for the others."""
    return np.diff(np.flatnonzero(nonzero), prepend=0)


def _fillers(advances: np.ndarray, advance_bits: int) -> np.ndarray:
    """Fillers in front of each non-zero when advances are stored at ``advance_bits``."""
    longest = (1 << advance_bits) - 1
    return np.maximum(advances - 1, 0) // longest


def entry_count(advances: np.ndarray, advance_bits: int) -> int:
    """Entries (non-zeros plus fillers) when advances are stored at ``advance_bits`` each."""
    return int(len(advances) + _fillers(advances, advance_bits).sum())


def cheapest_advance_bits(advances: np.ndarray, index_bits: int) -> tuple[int, int]:
    """The advance width that stores the fewest bits in all, and the entries it makes."""
    counts = {a: entry_count(advances, a) for a in ADVANCE_BITS}
    best = min(ADVANCE_BITS, key=lambda a: (counts[a] * (a + index_bits), a))
    return best, counts[best]


def sparse_bytes(entries: int, advance_bits: int, index_bits: int) -> int:
    """Bytes of ``entries`` fields of ``advance_bits + index_bits`` (padded to a byte)."""
    return math.ceil(entries * (advance_bits + index_bits) / 8)


@dataclass(frozen=True)
class SparseEntries:
    """One weight's non-zero codewords as entries: the advance to each and its index."""

    advances: np.ndarray  # [entries] each < 2^advance_bits
    indices: np.ndarray  # [entries] codebook index of each entry (fillers: a zero codeword)
    advance_bits: int
    index_bits: int
    fillers: int
    size: int  # positions in all: G·M

    @property
    def entries(self) -> int:
        return len(self.advances)

    @property
    def width(self) -> int:
        """Bits of one stored field."""
        return self.advance_bits + self.index_bits

    def fields(self) -> np.ndarray:
        """advance·2^b + index, one per entry (what is packed)."""
        return (self.advances.astype(np.int64) << self.index_bits) + self.indices

    def positions(self) -> np.ndarray:
        """Flat position of every entry, as the decoder computes it."""
        return np.cumsum(self.advances.astype(np.int64))


def encode(
    fit: CodebookFit, index_bits: int, advance_bits: int | None = None
) -> SparseEntries | None:
    """The fit's entries, advances at ``advance_bits`` (None: the cheapest width); None for
    vector codewords (product quantization: the dense form is stored).

    A filler lands inside a run of zeros, so the index stored there already names a zero
    codeword of its row: every entry takes the index at its position."""
    if fit.codebook.shape[2] != 1:
        return None
    groups, length = fit.indices.shape
    kept = np.flatnonzero(fit.decode().ravel() != 0)
    advances = np.diff(kept, prepend=0)
    if advance_bits is None:
        advance_bits, _ = cheapest_advance_bits(advances, index_bits)
    longest = (1 << advance_bits) - 1
    fill = _fillers(advances, advance_bits)
    serves = np.repeat(np.arange(len(kept)), fill + 1)  # the non-zero each entry leads to
    first = np.cumsum(fill + 1) - (fill + 1)  # entry number of each non-zero's first entry
    rank = np.arange(len(serves)) - first[serves]  # fillers 0 .. fill-1, then the non-zero
    is_filler = rank < fill[serves]
    before = kept[serves] - advances[serves]  # the position the run starts from
    positions = np.where(is_filler, before + (rank + 1) * longest, kept[serves])
    return SparseEntries(
        advances=np.diff(positions, prepend=0),
        indices=fit.indices.ravel()[positions].astype(np.int64),
        advance_bits=advance_bits,
        index_bits=index_bits,
        fillers=int(is_filler.sum()),
        size=groups * length,
    )
