"""Loading and saving models: paths, bytes, ModelProto, ir.Model, gs.Graph; external data;
atomic writes; the external-data path-traversal guard; size on disk."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxcompress import guards
from onnxcompress.errors import BadModel, BadPath

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
    notes: list[str] = field(default_factory=list)  # what loading changed (for the report)
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
        model, notes = _from_proto(_read_path(path), path.resolve().parent)
        return Loaded(model, "path", path, notes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        model, notes = _from_proto(_parse(bytes(source), "the given bytes"), None)
        return Loaded(model, "bytes", notes=notes)
    if isinstance(source, onnx.ModelProto):
        model, notes = _from_proto(source, None)
        return Loaded(model, "proto", notes=notes)
    if _is_graphsurgeon_graph(source):
        import onnx_graphsurgeon as gs

        model, notes = _from_proto(gs.export_onnx(source), None)
        return Loaded(model, "graphsurgeon", notes=notes)
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


def _read_path(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise BadModel(f"{path}: no such file")
    if path.is_dir():
        raise BadModel(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise BadModel(f"{path}: is empty")
    return _parse(path.read_bytes(), str(path))


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise BadModel(f"{where}: not an ONNX model or truncated ({exc})") from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.graph.node:
        raise BadModel(f"{where}: not an ONNX model (no graph, IR version or nodes)")
    return proto


def _from_proto(proto: onnx.ModelProto, base_dir: Path | None) -> tuple[ir.Model, list[str]]:
    """The model in onnx_ir form, and notes on what loading changed.

    Every tensor the model holds (initializers, Constant and other tensor attributes, in
    subgraphs and functions too) is checked before anything reads it: external data must lie
    inside the model's folder."""
    guards.check_header(proto)
    tensors = list(guards.all_tensor_protos(proto))
    for tensor in tensors:
        guards.check_tensor_data(tensor)
    external = [t for t in tensors if guards.is_external(t)]
    if external and base_dir is None:
        raise BadModel("the model references external data; load it from its file path")
    for tensor in external:
        guards.check_external_location(tensor, base_dir)
    notes = []
    if proto.graph.sparse_initializer:  # on a copy: a caller's ModelProto is never changed
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        proto, notes = copy, _densify_sparse_initializers(copy.graph)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise BadModel(f"the model cannot be read: {exc}") from None
    if base_dir is not None:
        keep_external_folder(model, base_dir)
    return model, notes


def keep_external_folder(model: ir.Model, base_dir: Path | str) -> None:
    """Point every external tensor of ``model`` (subgraphs, attributes and functions too) at
    the folder its data lives in, so that no relative location resolves against the working
    directory."""
    for tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = base_dir


def _densify_sparse_initializers(graph: onnx.GraphProto) -> list[str]:
    """Sparse initializers become dense ones: passes and onnx_ir read dense tensors only."""
    notes = []
    for sparse in graph.sparse_initializer:
        values = onnx.numpy_helper.to_array(sparse.values)
        indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), values.dtype)
        if indices.ndim == 2:  # coordinates [NNZ, rank]
            dense[tuple(indices.T)] = values
        else:  # linear indices [NNZ]
            dense.reshape(-1)[indices] = values
        graph.initializer.append(onnx.numpy_helper.from_array(dense, sparse.values.name))
        notes.append(f"sparse initializer {sparse.values.name!r} stored dense")
    del graph.sparse_initializer[:]
    return notes


def external_folders(model: ir.Model) -> set[str]:
    """The folders the external data of ``model``'s initializers is read from."""
    return {
        str(value.const_value.base_dir)
        for value in _initializers(model)
        if isinstance(value.const_value, ir.ExternalTensor)
    }


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
    target = write_target(path)
    if target.is_dir():
        raise BadPath(f"{target}: is a directory; give a file name for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = wants_external_data(model, external_threshold)
    data_name = data_file(target).name if external_data else None
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


def wants_external_data(model: ir.Model, threshold: int = DEFAULT_EXTERNAL_THRESHOLD) -> bool:
    """Whether ``save`` puts the weights in a data file by default: the model already reads
    external data, or its weights exceed ``threshold`` bytes."""
    return _has_external(model) or weight_bytes(model) > threshold


def write_target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: a symlink is written through, to the file it points at
    (the link stays a link), as a shell redirection would."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def data_file(target: str | os.PathLike) -> Path:
    """The external data file ``save`` writes beside ``target`` when it uses one."""
    target = Path(target)
    return target.parent / f"{target.name}.data"


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
    saved = [
        (v, v.type, v.shape)
        for v in _initializers(model)
        if not v.is_graph_input() and not v.is_graph_output()  # an output must keep its type
    ]
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
        for tensor in guards.all_tensor_protos(proto)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path, *(path.parent / loc for loc in sorted(locations))]


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the model file plus its external data files."""
    return sum(p.stat().st_size for p in files_on_disk(path) if p.exists())


def input_files(loaded: Loaded) -> list[Path]:
    """The files a loaded model consists of (its file first, then its external data files),
    symlinks resolved; none for a model that did not come from a file."""
    if loaded.path is None:
        return []
    data = {
        os.path.realpath(os.path.join(tensor.base_dir, tensor.location))
        for tensor in _all_tensors(loaded.model)
        if isinstance(tensor, ir.ExternalTensor)
    }
    return [Path(os.path.realpath(loaded.path)), *(Path(p) for p in sorted(data))]


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every tensor of the model: initializers of every graph, and tensor attributes."""
    yield from (v.const_value for v in _initializers(model) if v.const_value is not None)
    for graph in (model.graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in node.attributes.values():
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value


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
