"""New constants and nodes for the passes: names not taken yet in the model, and the tag that
says which pass made each node (``metadata_props["onnxcompress.pass"]``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.graph import output_bias, set_constant

PASS_TAG = "onnxcompress.pass"


class Namer:
    """Hands out node and value names that are not taken yet in a model."""

    def __init__(self, model: ir.Model) -> None:
        self._taken: set[str] = set()
        for graph in model.graphs():
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                self._taken.add(node.name or "")
                self._taken.update(o.name for o in node.outputs if o.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name


def tag(node: ir.Node, pass_name: str) -> ir.Node:
    node.metadata_props[PASS_TAG] = pass_name
    return node


class Emitter:
    """Makes the constants and nodes of one pass in one model's main graph.

    Constants are registered as initializers at once; nodes are returned named and tagged,
    for the pass to insert where they belong."""

    def __init__(self, model: ir.Model, pass_name: str, namer: Namer | None = None) -> None:
        self.model, self.graph, self.pass_name = model, model.graph, pass_name
        self.namer = namer or Namer(model)

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        """Register ``array`` as a new initializer named after ``base`` and return its value."""
        name = self.namer.fresh(base)
        array = np.asarray(array)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.Tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def node(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        *,
        name: str | None = None,
        output: str | None = None,
        domain: str = "",
    ) -> ir.Node:
        """A new node (not inserted yet), tagged, named after ``name``, with its first output
        named after ``output`` when given."""
        node = ir.node(op_type, list(inputs), attributes or {}, domain=domain)
        return self.adopt(node, name, output)

    def prepend(self, nodes: Sequence[ir.Node]) -> None:
        """Insert nodes that read only initializers (weight decoders) at the graph's start,
        where they keep it sorted."""
        if not nodes:
            return
        first = next(iter(self.graph), None)
        if first is None:
            self.graph.extend(nodes)
        else:
            self.graph.insert_before(first, nodes)

    def adopt(self, node: ir.Node, name: str | None = None, output: str | None = None) -> ir.Node:
        """Tag ``node`` as this pass's, and give it (and its first output) fresh names."""
        if name is not None:
            node.name = self.namer.fresh(name)
        if output is not None:
            node.outputs[0].name = self.namer.fresh(output)
        return tag(node, self.pass_name)

    def shift_bias(self, node: ir.Node, shift: np.ndarray, base: str) -> str | None:
        """Add ``shift`` (one value per output channel) to what ``node``'s bias adds to its
        output; a Conv/Gemm without a bias gets one named after ``base``. A bias read by other
        nodes too is replaced, not changed. Returns why nothing was done, or None."""
        bias, beta = output_bias(node)
        if beta == 0:
            return "Gemm beta is 0"
        values = np.asarray(shift, np.float64) / beta
        if bias is None:
            if node.op_type not in ("Conv", "Gemm"):
                return f"{node.op_type} has no bias to shift"
            dtype = node.inputs[1].const_value.dtype.numpy()
            node.resize_inputs(3)
            node.replace_input_with(2, self.constant(base, values.astype(dtype)))
            return None
        if bias.const_value is None or bias.is_graph_input():
            return "bias is not a constant"
        current = np.asarray(bias.const_value.numpy())
        if current.size not in (1, values.size):
            return f"bias of shape {list(current.shape)} is not per channel"
        if current.size == values.size:
            values = values.reshape(current.shape)
        updated = (current.astype(np.float64) + values).astype(current.dtype)
        if len(bias.uses()) == 1 and not bias.is_graph_output():
            set_constant(bias, updated)
        else:  # shared: this layer gets a bias of its own
            reader, index = _bias_use(node, bias)
            reader.replace_input_with(index, self.constant(base, updated))
        return None


def _bias_use(node: ir.Node, bias: ir.Value) -> tuple[ir.Node, int]:
    """Where the layer reads ``bias``: its own input 2, or the Add after a MatMul."""
    if node.op_type != "MatMul":
        return node, 2
    (add, _) = node.outputs[0].uses()[0]
    return add, next(i for i, value in enumerate(add.inputs) if value is bias)
