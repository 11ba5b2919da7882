"""Guards that keep a user's data safe and malformed models out, before any work: what a
model's tensors may hold and point at (data matching its dims, external data inside the
model's folder), and where a run may write (never over an input or another output, only
where a file can be written)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxcompress.errors import BadModel, BadPath


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def check_header(proto: onnx.ModelProto) -> None:
    """Refuse what onnx_ir would silently paper over: one domain imported at two versions (it
    keeps one), and input sizes below -1 (some exporters write -1 for "unknown")."""
    domains = [entry.domain if entry.domain != "ai.onnx" else "" for entry in proto.opset_import]
    repeated = sorted({domain for domain in domains if domains.count(domain) > 1})
    if repeated:
        label = ", ".join(repr(d or "ai.onnx") for d in repeated)
        raise BadModel(f"the model imports the opset of domain {label} more than once")
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if any(d.HasField("dim_value") and d.dim_value < -1 for d in dims):
            sizes = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise BadModel(f"input {value.name!r}: negative size in {sizes}")


#: Data types stored two values to a byte.
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    _PACKED_4BIT.add(onnx.TensorProto.FLOAT4E2M1)


def check_tensor_data(tensor: onnx.TensorProto) -> None:
    """Refuse a tensor whose stored data does not hold exactly what its dims declare (too
    short, too long, negative dims, or sizes no machine holds): reading it would fail deep
    inside a pass, or allocate terabytes."""
    name = tensor.name or "?"
    if any(d < 0 for d in tensor.dims):
        raise BadModel(f"tensor {name!r}: negative dimension in {list(tensor.dims)}")
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return
    count = math.prod(tensor.dims)
    expected, stored, unit = _stored_size(tensor, count)
    if stored is not None and stored != expected:
        what = "short" if stored < expected else "long"
        raise BadModel(
            f"tensor {name!r}: its data is too {what} for its dims {list(tensor.dims)} "
            f"({stored} {unit}, {expected} expected)"
        )


def _stored_size(tensor: onnx.TensorProto, count: int) -> tuple[int, int | None, str]:
    """(expected, stored, unit) of a tensor's data: bytes for raw or external data, values
    for the typed fields; stored is None when there is nothing to compare."""
    packed = tensor.data_type in _PACKED_4BIT
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    nbytes = (count + 1) // 2 if packed else count * itemsize
    if is_external(tensor):
        length = {e.key: e.value for e in tensor.external_data}.get("length")
        return nbytes, int(length) if length and length.isdigit() else None, "bytes"
    if tensor.HasField("raw_data"):
        return nbytes, len(tensor.raw_data), "bytes"
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    values = len(getattr(tensor, field))
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count *= 2
    elif packed:
        count = (count + 1) // 2
    return count, values if values or count else None, "values"


def check_external_location(tensor: onnx.TensorProto, base_dir: Path) -> None:
    """Refuse external data that resolves outside the model's folder or is not there whole.

    A location like ``../../etc/passwd`` or a symlink out of the folder would make a loader
    read (and a saver write) files the user never meant to expose.
    """
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    name = tensor.name or "?"
    if not location or "\0" in location:
        raise BadModel(f"tensor {name!r}: external data location {location!r} is not a file name")
    if os.path.isabs(location) or Path(location).drive:
        raise BadModel(f"tensor {name!r}: external data location {location!r} is absolute")
    base = os.path.realpath(base_dir)
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        raise BadModel(
            f"tensor {name!r}: external data location {location!r} points outside the "
            f"model's folder"
        )
    if not os.path.isfile(target):
        raise BadModel(f"tensor {name!r}: external data file {location!r} is missing")
    try:
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
    except ValueError:
        raise BadModel(f"tensor {name!r}: external data offset or length is not a number") from None
    if end > os.path.getsize(target):
        raise BadModel(f"tensor {name!r}: external data file {location!r} is truncated")


def all_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model holds: initializers (sparse ones' values too) and tensor
    attributes, in the main graph, its subgraphs and the model's functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def refuse_overwrites(
    outputs: list[tuple[str, Path]], inputs: list[Path], replaceable: tuple[Path, ...] = ()
) -> None:
    """Raise BadPath before any work when an output (a ``(what, path)`` pair) is one of the
    ``inputs`` (a model or its data, symlinks followed) or another output of the same run.
    ``replaceable`` are the inputs an in-place run may replace."""
    protected = {Path(os.path.realpath(p)) for p in inputs} - {
        Path(os.path.realpath(p)) for p in replaceable
    }
    seen: dict[Path, str] = {}
    for what, path in outputs:
        real = Path(os.path.realpath(path))
        if real in protected:
            raise BadPath(f"{path}: the {what} would overwrite an input file; choose another path")
        if real in seen:
            raise BadPath(f"{path}: the {what} and the {seen[real]} are the same file")
        seen[real] = what


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise BadPath when ``path`` cannot be written as a file: a folder, a name too long, a
    parent that is a file, a folder we may not write in (a read-only file system, /proc)."""
    path = Path(path)
    if path.is_dir():
        raise BadPath(f"{path}: is a directory; give a file name for the {what}")
    if len(path.name.encode()) > 255:
        raise BadPath(f"{path}: the {what}'s file name is too long")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise BadPath(f"{path}: {folder} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".onnxcompress-probe-", dir=folder)
    except OSError as exc:
        raise BadPath(f"{path}: cannot write the {what} in {folder} ({exc.strerror})") from None
    os.close(handle)
    os.unlink(probe)
