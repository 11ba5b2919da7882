"""Small models for every channel-coupling case, and an independent oracle for pruning them.

Each model is ONNX text whose weights are declared as graph inputs named ``W*``/``B*``/``P*``;
``build`` turns those into seeded random initializers. The oracle: pruning a set of channels
must equal running the original model with those channels multiplied by zero right before
every layer that reduces over them (Conv/Gemm/MatMul inputs). That holds whatever ops sit in
between, so it checks every index mapping of the walk and every fix-up of the removal.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from onnxcompress.emit import Emitter
from onnxcompress.graph import infer_shapes
from onnxcompress.normalize import normalize
from onnxcompress.passes.prune.channel_graph import ChannelGraph, pruned_atoms
from onnxcompress.passes.prune.channel_ops import build as build_channel_graph
from onnxcompress.passes.prune.channel_removal import apply

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def build(text: str, seed: int = 0) -> onnx.ModelProto:
    """Parse ``text``; inputs other than the first become random initializers."""
    model = onnx.parser.parse_model(text if text.lstrip().startswith("<") else HEADER + text)
    rng = np.random.default_rng(seed)
    graph = model.graph
    for value in list(graph.input)[1:]:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        if value.name.startswith("V"):  # variances: positive
            array = rng.uniform(0.5, 1.5, shape)
        else:
            array = rng.standard_normal(shape) * (0.5 if value.name.startswith("W") else 0.2)
        graph.initializer.append(numpy_helper.from_array(array.astype(dtype), value.name))
        graph.input.remove(value)
    onnx.checker.check_model(model)
    return model


def feed_for(model: onnx.ModelProto, seed: int = 1, batch: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    value = model.graph.input[0]
    shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
    if batch:
        shape[0] = batch
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return {value.name: rng.standard_normal(shape).astype(dtype)}


def walk(proto: onnx.ModelProto) -> tuple[ir.Model, ChannelGraph]:
    model = ir.from_proto(proto)
    normalize(model)
    inputs = {v.name: [d if isinstance(d, int) else 1 for d in v.shape] for v in model.graph.inputs}
    return model, build_channel_graph(model.graph, infer_shapes(model, inputs))


def random_pruning(cg: ChannelGraph, rng: np.random.Generator, share=0.5):
    """Prune a random subset of each prunable group's channels (at least one kept)."""
    chosen = []
    for group in cg.groups():
        if group.blocked or group.size < 2:
            continue
        blocks = group.blocks or [group.channels]
        size = len(blocks[0])
        count = min(size - 1, round(share * size)) if size > 1 else 0
        for block in blocks:  # grouped convs: the same count from each block
            chosen.extend(rng.choice(block, count, replace=False).tolist())
    pruned = pruned_atoms(cg, chosen)
    for cmap in cg.maps.values():  # as the pass does: no value loses every channel
        if len(cmap.atoms) and pruned[cmap.atoms].all():
            root = cg.find(int(cmap.atoms[0]))
            pruned[[a for a in range(len(cg.parent)) if cg.find(a) == root]] = False
    return pruned


def masked_oracle(model: ir.Model, cg: ChannelGraph, pruned) -> onnx.ModelProto:
    """The unpruned model with pruned channels zeroed at the input of every reducing layer."""
    proto = ir.to_proto(model)
    by_output = {n.output[0]: n for n in proto.graph.node}
    reducing = [(f.node, f.ref) for f in cg.slices if f.role == "in"] + [
        (f.node, f.info["input"]) for f in cg.attrs if f.kind == "grouped"
    ]
    for node_ir, value in reducing:
        if value not in cg.maps:
            continue
        cmap = cg.maps[value]
        shape = [1] * cmap.rank
        shape[cmap.axis] = len(cmap.atoms)
        mask = (~pruned[cmap.atoms]).astype(np.float32).reshape(shape)
        node = by_output[node_ir.outputs[0].name]
        name = f"mask_{node.output[0]}"
        if any(i.name == name for i in proto.graph.initializer):
            continue
        proto.graph.initializer.append(numpy_helper.from_array(mask, name))
        proto.graph.node.append(helper.make_node("Mul", [node.input[0], name], [name + "_out"]))
        node.input[0] = name + "_out"
    _sort(proto)
    return proto


def _sort(proto: onnx.ModelProto) -> None:
    model = ir.from_proto(proto)
    model.graph.sort()
    proto.CopyFrom(ir.to_proto(model))


def prune_in_place(model: ir.Model, cg: ChannelGraph, pruned) -> onnx.ModelProto:
    """Apply the pruning and return a checked proto (strict shape inference included)."""
    apply(cg, pruned, Emitter(model, "prune"))
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    return proto


# --- one model per coupling case ---------------------------------------------------------------
CONV_BN = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[8] B1, float[8] P1, float[8] P2,
   float[8] P3, float[8] V1, float[6, 8, 3, 3] W2) => (float[1, 6, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1, B1)
    b1 = BatchNormalization (c1, P1, P2, P3, V1)
    r1 = Relu (b1)
    Y = Conv <pads = [1, 1, 1, 1]> (r1, W2)
}"""

CONV_TRANSPOSE = """
g (float[1, 3, 6, 6] X, float[8, 3, 3, 3] W1, float[8, 6, 2, 2] W2, float[6] B2,
   float[4, 6, 3, 3] W3, float[4, 6, 1, 1] W4) => (float[1, 6, 12, 12] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    r1 = Relu (c1)
    t = ConvTranspose <strides = [2, 2]> (r1, W2, B2)
    r2 = Relu (t)
    c3 = Conv <pads = [1, 1, 1, 1]> (r2, W3)
    r3 = Relu (c3)
    Y = ConvTranspose (r3, W4)
}"""

GEMM = """
g (float[4, 10] X, float[12, 10] W1, float[12] B1, float[12, 9] W2, float[1, 9] B2,
   float[9, 5] W3) => (float[4, 5] Y) {
    h1 = Gemm <transB = 1> (X, W1, B1)
    r1 = Relu (h1)
    h2 = Gemm <alpha = 0.5, beta = 2.0> (r1, W2, B2)
    r2 = Tanh (h2)
    Y = Gemm (r2, W3)
}"""

MATMUL = """
g (float[2, 5, 10] X, float[10, 12] W1, float[12] B1, float[12, 7] W2) => (float[2, 5, 7] Y) {
    h1 = MatMul (X, W1)
    a1 = Add (h1, B1)
    r1 = Relu (a1)
    Y = MatMul (r1, W2)
}"""

PER_CHANNEL = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[8, 1, 1] P1, float[1, 8, 1, 1] P2,
   float[8, 1, 1] P3, float[8, 1, 1] V1, float[8, 1, 1] P4, float[8] P5, float[8] P6,
   float[5, 8, 1, 1] W2) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    m = Mul (c1, P1)
    a = Add (m, P2)
    s = Sub (a, P3)
    d = Div (s, V1)
    p = PRelu (d, P4)
    n = InstanceNormalization (p, P5, P6)
    Y = Conv (n, W2)
}"""

PASS_THROUGH = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[5, 8, 1, 1] W2) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    lo = Constant <value = float {-1.0}> ()
    hi = Constant <value = float {2.0}> ()
    a1 = Clip (c1, lo, hi)
    a2 = LeakyRelu <alpha = 0.1> (a1)
    sg = Sigmoid (a2)
    sw = Mul (a2, sg)
    a3 = HardSigmoid (sw)
    a4 = HardSwish (a3)
    a5 = Tanh (a4)
    a6 = Identity (a5)
    a7 = Dropout (a6)
    h = Cast <to = 10> (a7)
    a8 = Cast <to = 1> (h)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a8)
    pads = Constant <value = int64[8] {0, 0, 1, 1, 0, 0, 1, 1}> ()
    p2 = Pad (p1, pads)
    p3 = AveragePool <kernel_shape = [3, 3], strides = [1, 1]> (p2)
    roi = Constant <value = float[0] {}> ()
    scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    up = Resize <mode = "nearest"> (p3, roi, scales)
    Y = Conv (up, W2)
}"""

GLOBAL_POOL = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[4, 8, 1, 1] W2, float[8, 4, 1, 1] W3,
   float[5, 8, 1, 1] W4) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    gp = GlobalAveragePool (c1)
    s1 = Conv (gp, W2)
    r1 = Relu (s1)
    s2 = Conv (r1, W3)
    hs = HardSigmoid (s2)
    se = Mul (c1, hs)
    Y = Conv (se, W4)
}"""

RESIDUAL = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[8, 3, 1, 1] W2, float[8, 3, 3, 3] W3,
   float[8, 3, 3, 3] W4, float[5, 8, 1, 1] W5) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    c2 = Conv (X, W2)
    c3 = Conv <pads = [1, 1, 1, 1]> (X, W3)
    c4 = Conv <pads = [1, 1, 1, 1]> (X, W4)
    a = Add (c1, c2)
    s = Sub (a, c3)
    m = Mul (s, c4)
    x = Max (m, c1)
    Y = Conv (x, W5)
}"""

CONCAT = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[6, 3, 1, 1] W2, float[5, 17, 1, 1] W3)
  => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    c2 = Conv (X, W2)
    r2 = Relu (c2)
    cat = Concat <axis = 1> (c1, X, r2)
    Y = Conv (cat, W3)
}"""

CONCAT_OTHER_AXIS = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[8, 3, 1, 1] W2, float[5, 8, 1, 1] W3)
  => (float[1, 5, 16, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    c2 = Conv (X, W2)
    cat = Concat <axis = 2> (c1, c2)
    Y = Conv (cat, W3)
}"""

SPLIT_SLICE = """
g (float[1, 3, 8, 8] X, float[12, 3, 3, 3] W1, float[5, 4, 1, 1] W2, float[5, 8, 1, 1] W3,
   float[5, 6, 1, 1] W4) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    sizes = Constant <value = int64[2] {4, 8}> ()
    a, b = Split <axis = 1> (c1, sizes)
    ya = Conv (a, W2)
    yb = Conv (b, W3)
    starts = Constant <value = int64[1] {3}> ()
    ends = Constant <value = int64[1] {9}> ()
    axes = Constant <value = int64[1] {1}> ()
    sl = Slice (c1, starts, ends, axes)
    yc = Conv (sl, W4)
    s = Add (ya, yb)
    Y = Add (s, yc)
}"""

DEPTHWISE = """
g (float[1, 3, 8, 8] X, float[8, 3, 1, 1] W1, float[8, 1, 3, 3] W2, float[8] B2, float[8] P1,
   float[8] P2, float[8] P3, float[8] V1, float[5, 8, 1, 1] W3) => (float[1, 5, 8, 8] Y) {
    c1 = Conv (X, W1)
    r1 = Relu (c1)
    dw = Conv <group = 8, pads = [1, 1, 1, 1]> (r1, W2, B2)
    bn = BatchNormalization (dw, P1, P2, P3, V1)
    r2 = Relu (bn)
    Y = Conv (r2, W3)
}"""

FLATTEN_GEMM = """
g (float[2, 3, 6, 6] X, float[8, 3, 3, 3] W1, float[8] B1, float[10, 72] W2, float[10] B2,
   float[6, 3, 3, 3] W3, float[54, 4] W4) => (float[2, 10] Y, float[2, 4] Z) {
    c1 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (X, W1, B1)
    r1 = Relu (c1)
    f = Flatten (r1)
    Y = Gemm <transB = 1> (f, W2, B2)
    c2 = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (X, W3)
    shape = Constant <value = int64[2] {2, 54}> ()
    rs = Reshape (c2, shape)
    Z = MatMul (rs, W4)
}"""

TRANSPOSE = """
g (float[1, 3, 4, 4] X, float[8, 3, 1, 1] W1, float[8, 5] W2) => (float[1, 4, 4, 5] Y) {
    c1 = Conv (X, W1)
    t = Transpose <perm = [0, 2, 3, 1]> (c1)
    Y = MatMul (t, W2)
}"""

QDQ = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[5, 8, 1, 1] W2) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    scale = Constant <value = float[8] {0.02, 0.03, 0.04, 0.05, 0.02, 0.03, 0.04, 0.05}> ()
    zero = Constant <value = int8[8] {0, 1, -1, 2, 0, 1, -1, 2}> ()
    q = QuantizeLinear <axis = 1> (c1, scale, zero)
    dq = DequantizeLinear <axis = 1> (q, scale, zero)
    Y = Conv (dq, W2)
}"""

GROUPED = """
g (float[1, 3, 8, 8] X, float[8, 3, 3, 3] W1, float[12, 4, 3, 3] W2, float[12] B2,
   float[5, 12, 1, 1] W3) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    r1 = Relu (c1)
    g2 = Conv <group = 2, pads = [1, 1, 1, 1]> (r1, W2, B2)
    r2 = Relu (g2)
    Y = Conv (r2, W3)
}"""

UPSAMPLE = """<ir_version: 4, opset_import: ["" : 9]>
g (float[1, 3, 4, 4] X, float[8, 3, 3, 3] W1, float[5, 8, 1, 1] W2) => (float[1, 5, 8, 8] Y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (X, W1)
    gp = GlobalMaxPool (c1)
    m = Mul (c1, gp)
    scales = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    up = Upsample <mode = "nearest"> (m, scales)
    Y = Conv (up, W2)
}"""

COUPLING_CASES = {
    "upsample_opset9": UPSAMPLE,
    "grouped": GROUPED,
    "conv_bn": CONV_BN,
    "conv_transpose": CONV_TRANSPOSE,
    "gemm": GEMM,
    "matmul": MATMUL,
    "per_channel": PER_CHANNEL,
    "pass_through": PASS_THROUGH,
    "global_pool_se": GLOBAL_POOL,
    "residual": RESIDUAL,
    "concat": CONCAT,
    "concat_other_axis": CONCAT_OTHER_AXIS,
    "split_slice": SPLIT_SLICE,
    "depthwise": DEPTHWISE,
    "flatten_gemm_reshape_matmul": FLATTEN_GEMM,
    "transpose": TRANSPOSE,
    "qdq": QDQ,
}


# --- random stacks for the property test --------------------------------------------------------
class StackBuilder:
    """Conv/BN/activation/residual/Concat/depthwise/grouped/pool stacks ending in Flatten→Gemm."""

    def __init__(self, seed: int, channels_in: int = 3, size: int = 8) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.current, self.channels, self.size = "X", channels_in, size
        self.input_channels = channels_in
        self._count = 0

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def _weight(self, shape: list[int], base: str = "W", scale: float = 0.5) -> str:
        name = self._name(base)
        array = self.rng.standard_normal(shape) * scale
        if base == "V":
            array = self.rng.uniform(0.5, 1.5, shape)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, source: str, c_in: int, c_out: int, kernel: int, bn: bool, act: str) -> str:
        inputs = [source, self._weight([c_out, c_in, kernel, kernel])]
        if not bn:
            inputs.append(self._weight([c_out], "B", 0.2))
        out = self._name("conv")
        pad = kernel // 2
        self.nodes.append(helper.make_node("Conv", inputs, [out], pads=[pad] * 4))
        if bn:
            params = [self._weight([c_out], k, 0.3) for k in ("P", "P", "P", "V")]
            out = self._op("BatchNormalization", [out, *params])
        return self.activation(out, act)

    def activation(self, source: str, act: str) -> str:
        if act == "swish":
            return self._op("Mul", [source, self._op("Sigmoid", [source])])
        return self._op(act, [source]) if act != "none" else source

    def _op(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def step(self, kind: str, width: int, act: str, bn: bool) -> None:
        c = self.channels
        if kind == "conv":
            self.current = self.conv(self.current, c, width, 3, bn, act)
            self.channels = width
        elif kind == "residual":
            main = self.conv(self.current, c, width, 3, bn, act)
            skip = self.conv(self.current, c, width, 1, False, "none")
            self.current, self.channels = self._op("Add", [main, skip]), width
        elif kind == "concat":
            left = self.conv(self.current, c, width, 3, bn, act)
            right = self.conv(self.current, c, max(1, width // 2), 1, False, act)
            self.current = self._op("Concat", [left, right], axis=1)
            self.channels = width + max(1, width // 2)
        elif kind == "depthwise":
            weight = self._weight([c, 1, 3, 3])
            out = self._name("dw")
            self.nodes.append(
                helper.make_node("Conv", [self.current, weight], [out], group=c, pads=[1] * 4)
            )
            self.current = self.activation(out, act)
        elif kind == "grouped" and c % 2 == 0:
            weight = self._weight([2 * width, c // 2, 3, 3])
            out = self._name("grouped")
            self.nodes.append(
                helper.make_node("Conv", [self.current, weight], [out], group=2, pads=[1] * 4)
            )
            self.current, self.channels = self.activation(out, act), 2 * width
        elif kind == "pool" and self.size >= 4:
            self.current = self._op("MaxPool", [self.current], kernel_shape=[2, 2], strides=[2, 2])
            self.size //= 2

    def finish(self, classes: int, trans_b: bool) -> onnx.ModelProto:
        flat = self._op("Flatten", [self.current])
        features = self.channels * self.size * self.size
        shape = [classes, features] if trans_b else [features, classes]
        inputs = [flat, self._weight(shape), self._weight([classes], "B", 0.2)]
        self.nodes.append(helper.make_node("Gemm", inputs, ["Y"], transB=int(trans_b)))
        graph = helper.make_graph(
            self.nodes,
            "stack",
            [helper.make_tensor_value_info("X", 1, [2, self.input_channels, 8, 8])],
            [helper.make_tensor_value_info("Y", 1, [2, classes])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model
