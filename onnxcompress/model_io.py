"""Loading and saving models: paths, bytes, ModelProto, ir.Model, gs.Graph; external data;
atomic writes; the external-data path-traversal guard; size on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxcompress.errors import BadModel

logger = logging.getLogger(__name__)

#: Above this many bytes of weights a model is saved with external data by default.
DEFAULT_EXTERNAL_THRESHOLD = 1 << 30
#: Tensors at least this large go to the external data file when it is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024

ModelLike = Any  # str | os.PathLike | bytes | onnx.ModelProto | ir.Model | gs.Graph


@dataclass
class Loaded:
    """A model in onnx_ir form plus where it came from, so results can go back in kind."""

    model: ir.Model
    kind: str  # "path", "bytes", "proto", "ir", "graphsurgeon"
    path: Path | None = None
    uses_external_data: bool = field(init=False)

    def __post_init__(self) -> None:
        # Remembered now: passes replace weights, and the output should follow the input's form.
        self.uses_external_data = _has_external(self.model)


def load(source: ModelLike) -> Loaded:
    """Load a model from a path, bytes, ModelProto, ir.Model or onnx_graphsurgeon Graph."""
    if isinstance(source, ir.Model):
        return Loaded(source, "ir")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return Loaded(_load_path(path), "path", path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Loaded(_from_proto(_parse(bytes(source), "the given bytes"), None), "bytes")
    if isinstance(source, onnx.ModelProto):
        return Loaded(_from_proto(source, None), "proto")
    if _is_graphsurgeon_graph(source):
        import onnx_graphsurgeon as gs

        return Loaded(_from_proto(gs.export_onnx(source), None), "graphsurgeon")
    raise BadModel(f"cannot load a model from a {type(source).__name__}")


def convert_back(model: ir.Model, kind: str) -> Any:
    """Return ``model`` in the same kind of object it was loaded from."""
    if kind in ("ir", "path"):
        return model
    proto = ir.to_proto(model)
    if kind == "bytes":
        return proto.SerializeToString()
    if kind == "proto":
        return proto
    if kind == "graphsurgeon":
        import onnx_graphsurgeon as gs

        return gs.import_onnx(proto)
    raise ValueError(f"unknown model kind {kind!r}")


def _is_graphsurgeon_graph(obj: object) -> bool:
    cls = type(obj)
    return cls.__name__ == "Graph" and cls.__module__.startswith("onnx_graphsurgeon")


def _load_path(path: Path) -> ir.Model:
    if not path.exists():
        raise BadModel(f"{path}: no such file")
    if path.is_dir():
        raise BadModel(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise BadModel(f"{path}: is empty")
    return _from_proto(_parse(path.read_bytes(), str(path)), path.resolve().parent)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise BadModel(f"{where}: not an ONNX model or truncated ({exc})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.node:
        raise BadModel(f"{where}: not an ONNX model (no graph, IR version or nodes)")
    return proto


def _from_proto(proto: onnx.ModelProto, base_dir: Path | None) -> ir.Model:
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise BadModel(f"the model cannot be read: {exc}") from None
    external = [v for v in _initializers(model) if isinstance(v.const_value, ir.ExternalTensor)]
    if external and base_dir is None:
        raise BadModel("the model references external data; load it from its file path")
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
        for value in external:
            check_external_location(value.const_value, base_dir)
    return model


def check_external_location(tensor: ir.ExternalTensor, base_dir: Path) -> None:
    """Refuse external data that resolves outside the model's folder or is not there whole.

    A location like ``../../etc/passwd`` or a symlink out of the folder would make a loader
    read (and a saver write) files the user never meant to expose.
    """
    location = tensor.location
    name = tensor.name or "?"
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
    end = (tensor.offset or 0) + (tensor.length or 0)
    if end > os.path.getsize(target):
        raise BadModel(f"tensor {name!r}: external data file {location!r} is truncated")


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for graph in model.graphs() for v in graph.initializers.values()]


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by all initializers (the weights), without loading them."""
    return sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    external_threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    Everything is written into a temporary folder beside the target and renamed into place,
    so a failure never leaves a half-written file. With ``external_data=None`` the weights go
    to ``<name>.data`` when they exceed ``external_threshold`` bytes or the model already used
    external data.
    """
    target = Path(path)
    if target.is_dir():
        raise BadModel(f"{target}: is a directory; give a file name for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _has_external(model) or weight_bytes(model) > external_threshold
    data_name = f"{target.name}.data" if external_data else None
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=target.parent))
    try:
        with _weights_in_memory_unless(external_data, model), _no_initializer_value_info(model):
            _write(model, tmp_dir / target.name, data_name)
        written = []
        if data_name:  # data first: the model file appears last, complete
            os.replace(tmp_dir / data_name, target.parent / data_name)
            written.append(target.parent / data_name)
        os.replace(tmp_dir / target.name, target)
        written.insert(0, target)
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write(model: ir.Model, tmp_path: Path, data_name: str | None) -> None:
    try:
        if data_name:
            ir.save(
                model,
                tmp_path,
                external_data=data_name,
                size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            )
        else:
            ir.save(model, tmp_path)
    except ValueError as exc:
        if "2GB" in str(exc) or "2 GB" in str(exc):
            raise BadModel("the model is over 2 GiB; save it with external data") from None
        raise


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(model))


@contextlib.contextmanager
def _weights_in_memory_unless(external_data: bool, model: ir.Model):
    """Inline external tensors for a single-file save (their paths would be wrong there)."""
    if external_data:
        yield
        return
    swapped = []
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            swapped.append((value, tensor))
            value.const_value = ir.Tensor(np.asarray(tensor.numpy()), name=tensor.name)
    try:
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


@contextlib.contextmanager
def _no_initializer_value_info(model: ir.Model):
    """Save initializers without a value_info copy of their type and shape.

    onnx_ir writes one for every typed value; for weights it only repeats what the tensor
    already says, and it grows a file that the user asked to make smaller.
    """
    saved = [(v, v.type, v.shape) for v in _initializers(model) if not v.is_graph_input()]
    for value, _, _ in saved:
        value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in saved:
            value.type, value.shape = type_, shape


def files_on_disk(path: str | os.PathLike) -> list[Path]:
    """The model file and every external data file it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _all_tensor_protos(proto.graph)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path, *(path.parent / loc for loc in sorted(locations))]


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the model file plus its external data files."""
    return sum(p.stat().st_size for p in files_on_disk(path) if p.exists())


def _all_tensor_protos(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _all_tensor_protos(sub)


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
