"""``inspect``: the layers of a model that hold weights, what they cost, which passes apply."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx_ir as ir

from onnxcompress import model_io
from onnxcompress.calibration import known_input_shapes, with_default_batch
from onnxcompress.graph import default_opset, model_macs, node_label, node_macs, weight_params
from onnxcompress.normalize import normalize
from onnxcompress.passes import PASSES
from onnxcompress.pipeline import resolve_shapes
from onnxcompress.report import table

#: A constant input with fewer elements than this is a shape or scalar, not a weight.
_MIN_WEIGHT_SIZE = 16


@dataclass
class LayerRow:
    node: str
    op_type: str
    weights: dict[str, list[int]]
    params: int
    macs: int | None
    passes: list[str]


@dataclass
class Inspection:
    source: str | None
    opset: int | None
    nodes: int
    params: int
    weight_bytes: int
    macs: int
    file_bytes: int | None
    input_shapes: dict[str, list[int]]
    layers: list[LayerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        rows = [
            [
                layer.node,
                layer.op_type,
                " ".join("x".join(map(str, s)) for s in layer.weights.values()),
                f"{layer.params:,}",
                "-" if layer.macs is None else f"{layer.macs:,}",
                ",".join(layer.passes) or "-",
            ]
            for layer in self.layers
        ]
        lines = [f"{self.source or 'model'}: opset {self.opset}, {self.nodes} nodes"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += table(["layer", "op", "weight shape", "params", "MACs", "passes"], rows, left=2)
        size = "-" if self.file_bytes is None else f"{self.file_bytes:,}"
        lines.append(
            f"total: {self.params:,} params, {self.weight_bytes:,} weight bytes, "
            f"{self.macs:,} MACs, {size} bytes on disk"
        )
        return "\n".join(lines)


def inspect_model(source: model_io.ModelLike, dims: Mapping[str, int] | None = None) -> Inspection:
    """Per-layer table of a model; ``dims`` sizes symbolic input dims for MAC counting."""
    loaded = model_io.load(source)
    model = loaded.model
    notes = normalize(model)
    dims, batch_notes = with_default_batch(model, dims or {})
    notes += batch_notes
    input_shapes = known_input_shapes(model, dims)
    shapes = resolve_shapes(model, input_shapes)
    params, nbytes = weight_params(model)
    layers = [_layer(node, shapes) for node in model.graph if _weights(node)]
    return Inspection(
        source=str(loaded.path) if loaded.path else None,
        opset=default_opset(model),
        nodes=sum(1 for _ in model.graph),
        params=params,
        weight_bytes=nbytes,
        macs=model_macs(model, shapes),
        file_bytes=model_io.size_on_disk(loaded.path) if loaded.path else None,
        input_shapes=input_shapes,
        layers=layers,
        notes=notes,
    )


def _weights(node: ir.Node) -> dict[str, list[int]]:
    return {
        value.name: list(value.const_value.shape)
        for value in node.inputs
        if value is not None
        and value.const_value is not None
        and value.const_value.size >= _MIN_WEIGHT_SIZE
    }


def _layer(node: ir.Node, shapes) -> LayerRow:
    weights = _weights(node)
    return LayerRow(
        node=node_label(node),
        op_type=node.op_type,
        weights=weights,
        params=sum(math.prod(s) for s in weights.values()),
        macs=node_macs(node, shapes),
        passes=[name for name, cls in PASSES.items() if cls.applies(node)],
    )
