"""Feeds for calibration and validation: a .npz, a folder of .npy files, or seeded synthetic
data shaped like the model's inputs. A feed is one ``{input name: array}`` batch."""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import BadData, first_line

Feed = dict[str, np.ndarray]
Dims = dict[str, int]  # symbolic dim name -> size, or "input:axis" -> size

DEFAULT_SAMPLES = 8
DEFAULT_BATCH = 8
#: A synthetic batch of one input larger than this is refused: it would not fit in memory
#: (a size of 2**40 in a model's input), and a real one would come as data.
MAX_SYNTHETIC_BYTES = 4 << 30


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # str: a named symbolic dim; None: unnamed or -1

    def shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape, with symbolic dims from ``dims``; a clear error when one is unset."""
        shape = []
        for axis, dim in enumerate(self.dims):
            by_axis = dims.get(f"{self.name}:{axis}")
            if by_axis is not None:
                shape.append(by_axis)
            elif isinstance(dim, int):
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            else:
                hint = (
                    f"--dim {dim}=VALUE"
                    if isinstance(dim, str)
                    else f"--dim {self.name}:{axis}=VALUE"
                )
                label = f"'{dim}'" if isinstance(dim, str) else "unnamed"
                raise BadData(
                    f"input {self.name!r} axis {axis} has a symbolic size ({label}) with no "
                    f"value; set it with {hint}"
                )
        return tuple(shape)


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.dtype is None or value.shape is None:
            raise BadData(f"input {value.name!r} has no tensor type or shape")
        dims = tuple(_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), dims))
    return specs


def _dim(dim: object) -> int | str | None:
    if isinstance(dim, int):
        return dim if dim > 0 else None
    name = getattr(dim, "value", None)
    return name if isinstance(name, str) and name not in ("", "?") else None


def with_default_batch(model: ir.Model, dims: Mapping[str, int]) -> tuple[Dims, list[str]]:
    """``dims`` plus a size of 1 for each input's symbolic leading (batch) axis that ``dims``
    leaves open, as exporters write a dynamic batch (``N``, ``batch``, ``-1``); and a note for
    each default taken. Other symbolic axes stay open: guessing a sequence length or an image
    size would hide a choice the user has to make."""
    chosen: Dims = dict(dims)
    notes = []
    for spec in input_specs(model):
        batch = spec.dims[0] if spec.dims else 1
        if isinstance(batch, int) or f"{spec.name}:0" in chosen or batch in chosen:
            continue
        key = batch if isinstance(batch, str) else f"{spec.name}:0"
        chosen[key] = 1
        notes.append(
            f"input {spec.name!r}: batch axis ({key}) set to 1 for synthetic feeds and "
            f"accounting (set it with --dim {key}=N)"
        )
    return chosen, notes


def known_input_shapes(model: ir.Model, dims: Mapping[str, int]) -> dict[str, list[int]]:
    """Concrete shapes of the inputs that ``dims`` (or the model itself) settles fully."""
    shapes = {}
    for spec in input_specs(model):
        try:
            shapes[spec.name] = list(spec.shape(dims))
        except BadData:
            continue
    return shapes


def zeros_feed(model: ir.Model, input_shapes: Mapping[str, Sequence[int]]) -> Feed | None:
    """A feed of zeros when every input has a concrete shape, else None."""
    specs = input_specs(model)
    if any(spec.name not in input_shapes for spec in specs):
        return None
    shapes = {spec.name: tuple(input_shapes[spec.name]) for spec in specs}
    if any(_nbytes(shapes[spec.name], spec.dtype) > MAX_SYNTHETIC_BYTES for spec in specs):
        return None  # accounting only: shapes stay as inference gives them
    return {spec.name: np.zeros(shapes[spec.name], spec.dtype) for spec in specs}


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def parse_dims(items: Sequence[str]) -> Dims:
    """Parse ``NAME=VALUE`` (a named symbolic dim) or ``INPUT:AXIS=VALUE`` options."""
    dims: Dims = {}
    for item in items:
        key, eq, value = item.rpartition("=")
        if not eq or not key or not value.strip().isascii() or not value.strip().isdigit():
            raise BadData(f"bad --dim {item!r}: expected NAME=SIZE or INPUT:AXIS=SIZE")
        if int(value) <= 0:
            raise BadData(f"bad --dim {item!r}: expected NAME=SIZE or INPUT:AXIS=SIZE")
        dims[key.strip()] = int(value)
    return dims


def synthetic_feeds(
    model: ir.Model, dims: Mapping[str, int], samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> list[Feed]:
    """Seeded random batches matching each input's dtype and shape: normal floats, small ints."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    shapes = {spec.name: spec.shape(dims) for spec in specs}
    for spec in specs:
        if _nbytes(shapes[spec.name], spec.dtype) > MAX_SYNTHETIC_BYTES:
            raise BadData(
                f"input {spec.name!r} of shape {list(shapes[spec.name])} is too large for "
                f"synthetic data; give smaller sizes with --dim, or real data"
            )
    return [
        {spec.name: _random(rng, spec.dtype, shapes[spec.name]) for spec in specs}
        for _ in range(samples)
    ]


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise BadData(f"cannot make synthetic data of dtype {dtype}")


def load_feeds(
    source: str | os.PathLike,
    model: ir.Model,
    dims: Mapping[str, int] | None = None,
    batch_size: int = DEFAULT_BATCH,
    limit: int | None = None,
) -> FileFeeds:
    """Read feeds from a .npz (keys = input names) or a folder of .npy files.

    In a folder, files named after the inputs (``/`` and ``:`` written as ``_``) hold all
    samples of that input; for a single-input model, every .npy file is a batch of it.
    Arrays stack samples on axis 0 and are cut into batches the model accepts. Every batch is
    read and checked here; the feeds then read each batch from its file again when asked
    for it (see ``FileFeeds``).
    """
    path = Path(source)
    if not path.exists():
        raise BadData(f"{path}: no such file or folder")
    specs = input_specs(model)
    arrays = _read_npz(path) if path.is_file() else _read_folder(path, specs)
    if isinstance(arrays, list):  # one-input folder: already a list of batches
        batches = [{specs[0].name: _Rows(array)} for array in arrays[:limit]]
    else:
        batches = _batches(arrays, specs, batch_size, limit)
    feeds = FileFeeds(batches, specs, dims or {})
    for _ in feeds:  # refuse bad data now, before any work
        pass
    return feeds


#: Gives an input's array (memory-mapped from its file where it can be) when called.
Source = Callable[[], np.ndarray]


@dataclass(frozen=True)
class _Rows:
    """Samples ``start:stop`` of the array ``source`` gives."""

    source: Source
    start: int | None = None
    stop: int | None = None

    def read(self) -> np.ndarray:
        """A copy: the file's mapping closes once it is made."""
        return np.array(self.source()[self.start : self.stop])


class FileFeeds(Sequence[Feed]):
    """Feeds read from their files each time one is asked for: an array's file is mapped only
    while a batch is copied out, so memory holds the batches in use, never all the samples,
    whatever their number (a mapping's pages would count as the process's memory for as long
    as it stays open). A slice is FileFeeds too."""

    def __init__(
        self, batches: list[dict[str, _Rows]], specs: list[InputSpec], dims: Mapping[str, int]
    ) -> None:
        self._batches, self._specs, self._dims = batches, specs, dims

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return FileFeeds(self._batches[index], self._specs, self._dims)
        rows = self._batches[index]
        return _check_feed(
            {name: part.read() for name, part in rows.items()}, self._specs, self._dims
        )


def _load_npy(path: Path) -> np.ndarray:
    """A .npy memory-mapped (a header that declares more than the file holds is refused, not
    allocated), or a .npz archive; never a pickle."""
    mmap = "r" if path.suffix == ".npy" else None
    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise BadData(f"{path}: not a readable .npy/.npz file ({first_line(exc)})") from None


def _read_npz(path: Path) -> dict[str, Source]:
    """A source per array of a .npz: arrays stored uncompressed (``np.savez``) are mapped
    from the archive like a .npy; compressed ones are read into memory here, once."""
    if path.suffix == ".npy":
        raise BadData(f"{path}: a single .npy needs a folder; use a .npz keyed by input name")
    data = _load_npy(path)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadData(f"{path}: expected a .npz archive keyed by input name")
    with data:
        try:
            return {key: _npz_source(path, data, key) for key in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
            raise BadData(f"{path}: an array cannot be read ({first_line(exc)})") from None


def _npz_source(path: Path, data: np.lib.npyio.NpzFile, key: str) -> Source:
    info = data.zip.getinfo(f"{key}.npy") if f"{key}.npy" in data.zip.namelist() else None
    if info is None or info.compress_type != zipfile.ZIP_STORED:
        array = data[key]
        return lambda: array
    offset = _stored_npy(path, info)
    return lambda: _map_npy(path, offset)


def _stored_npy(path: Path, info: zipfile.ZipInfo) -> int:
    """Where the .npy stored uncompressed as ``info`` starts in the archive ``path``."""
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        local = stream.read(30)  # the member's local header: its name and extra field follow
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"bad local header for {info.filename}")
        name, extra = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name + extra
    _map_npy(path, offset)  # refuse a bad header now
    return offset


def _map_npy(path: Path, offset: int) -> np.ndarray:
    """The .npy at ``offset`` in ``path``, memory-mapped; never a pickle."""
    with open(path, "rb") as stream:
        stream.seek(offset)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        start = stream.tell()
    if dtype.hasobject:
        raise ValueError("the array holds Python objects (pickles are never loaded)")
    if math.prod(shape) == 0:  # nothing to map (and mmap refuses a length of 0)
        return np.empty(shape, dtype)
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order=order)


def _safe_name(name: str) -> str:
    return re.sub(r"[/\\:]", "_", name)


def _read_folder(path: Path, specs: list[InputSpec]) -> dict[str, Source] | list[Source]:
    files = sorted(f for f in path.glob("*.npy") if f.is_file())  # a FIFO would block
    if not files:
        raise BadData(f"{path}: no .npy files in the folder")
    by_name = {f.stem: f for f in files}
    if all(_safe_name(s.name) in by_name for s in specs):
        return {s.name: _npy_source(by_name[_safe_name(s.name)]) for s in specs}
    if len(specs) == 1:
        return [_npy_source(f) for f in files]
    names = ", ".join(_safe_name(s.name) + ".npy" for s in specs)
    raise BadData(f"{path}: expected one file per input: {names}")


def _npy_source(path: Path) -> Source:
    _load_npy(path)  # refuse a bad header now
    return lambda: _load_npy(path)


def _batches(
    sources: Mapping[str, Source], specs: list[InputSpec], batch_size: int, limit: int | None
) -> list[dict[str, _Rows]]:
    missing = [s.name for s in specs if s.name not in sources]
    if missing:
        raise BadData(f"calibration data has no array for input(s) {', '.join(missing)}")
    shapes = {s.name: np.shape(sources[s.name]()) for s in specs}
    scalars = [name for name, shape in shapes.items() if not shape]
    if scalars:
        raise BadData(f"calibration data for {', '.join(scalars)} is a scalar, not samples")
    counts = {shape[0] for shape in shapes.values()}
    if len(counts) != 1:
        raise BadData("calibration arrays hold different numbers of samples")
    total = counts.pop()
    fixed = specs[0].dims and isinstance(specs[0].dims[0], int)
    step = specs[0].dims[0] if fixed else batch_size
    batches = []
    for start in range(0, total, step):
        if min(start + step, total) - start < step and fixed:
            break  # a fixed-batch model cannot take the short tail
        batches.append({s.name: _Rows(sources[s.name], start, start + step) for s in specs})
        if limit is not None and len(batches) >= limit:
            break
    return batches


def _check_feed(feed: Feed, specs: list[InputSpec], dims: Mapping[str, int]) -> Feed:
    checked = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        if array.ndim != len(spec.dims):
            raise BadData(
                f"input {spec.name!r}: data has {array.ndim} dims, the model expects "
                f"{len(spec.dims)} {tuple(spec.dims)}"
            )
        for axis, (have, want) in enumerate(zip(array.shape, spec.dims)):
            want = dims.get(
                f"{spec.name}:{axis}", dims.get(want, want) if isinstance(want, str) else want
            )
            if isinstance(want, int) and have != want and axis > 0:
                raise BadData(
                    f"input {spec.name!r}: axis {axis} is {have}, the model expects {want}"
                )
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, "same_kind"):
                raise BadData(
                    f"input {spec.name!r}: data is {array.dtype}, the model expects {spec.dtype}"
                )
            array = array.astype(spec.dtype)
        checked[spec.name] = array
    check_finite([checked])
    return checked


def check_finite(feeds: Sequence[Feed]) -> None:
    """Refuse feeds holding NaN or infinities: one spreads through every statistic and
    least-squares fit built on the data, and through every error measured on it."""
    for feed in feeds:
        for name, array in feed.items():
            array = np.asarray(array)
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise BadData(f"input {name!r}: data holds NaN or infinite values")
