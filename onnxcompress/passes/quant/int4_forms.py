"""The graph forms the int4 pass writes, and which one pays on a CPU.

- ``matmulnbits``: onnxruntime's com.microsoft MatMulNBits replaces the MatMul (or Gemm); the
  weight stays 4-bit in memory and, with ``accuracy_level=4``, the product runs on int8
  activations. The fastest form where the layer is large enough (``nbits_pays``).
- ``dq``: a standard blocked DequantizeLinear (opset 21) feeds the op. onnxruntime fuses it into
  MatMulNBits for a MatMul (axis 0, 2-D constant weight), not for a Gemm or a Gather: those
  dequantize the whole weight on every run.
- ``folded``: the codes are unpacked and scaled by standard ops (BitShift, Mod, Cast, Pad, Sub,
  Mul, Reshape, Slice) that read only initializers, so onnxruntime folds them into the float
  weight when the session is created: the file holds 4 bits a weight, the run is float's.
- ``gather``: com.microsoft GatherBlockQuantized reads only the rows it gathers from a 4-bit
  table (uint8 data, bits=4).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress import latency
from onnxcompress.emit import Emitter
from onnxcompress.passes.quant.int4_pack import (
    Int4Blocks,
    folded_operands,
    gather_operands,
    matmulnbits_operands,
)

#: BitShift is the newest op the folded decoder uses.
FOLD_OPSET = 11
MS_DOMAIN = "com.microsoft"

#: Smallest MatMulNBits (accuracy_level 4) that runs faster than onnxruntime's float GEMM, as
#: (min K, min N, min K*N) by block size, for more than one activation row. Measured layer by
#: layer, side by side, on a 2-core AMD EPYC (Zen 5: AVX-512 VNNI), onnxruntime 1.32, 1 and 2
#: threads, rows 16 to 512 (``python bench/int4.py --shapes``): a smaller layer spends more on
#: quantizing its activations and scaling its blocks than the 4-bit weight saves, and smaller
#: blocks cost more scaling. Below a limit MatMulNBits ran up to 1.7x slower than float (3x at
#: block 16); above it 0.5-0.95x.
NBITS_MIN_SIZE = {
    16: (2048, 512, 1 << 21),
    32: (1024, 256, 1 << 20),
    64: (1024, 256, 1 << 18),
    128: (384, 256, 1 << 18),
    256: (384, 256, 1 << 18),
}
#: With a single activation row the product is bound by reading the weight: 4 bits win from
#: this K*N on (block 16, with four times the scales of block 64, from a larger one).
NBITS_MIN_SIZE_ONE_ROW = {16: 1 << 19}
ONE_ROW_DEFAULT = 1 << 17


def nbits_pays(rows: int | None, k: int, n: int, block: int, accuracy_level: int) -> str | None:
    """Why MatMulNBits would run slower than the float MatMul on a CPU, or None if it pays.

    ``rows``: activation rows per run (the product of the input's leading dims), None if
    unknown (then judged as several rows)."""
    if accuracy_level != 4:
        return f"the size rule covers accuracy_level 4 only (min_speedup measures {accuracy_level})"
    if rows == 1:
        min_kn = NBITS_MIN_SIZE_ONE_ROW.get(block, ONE_ROW_DEFAULT)
        if k * n >= min_kn:
            return None
        return f"{k}x{n} too small for MatMulNBits at 1 row (needs K*N >= 2^{_log2(min_kn)})"
    min_k, min_n, min_kn = NBITS_MIN_SIZE[block]
    if k < min_k or n < min_n or k * n < min_kn:
        needs = f"K >= {min_k}, N >= {min_n}, K*N >= 2^{_log2(min_kn)}"
        return f"{k}x{n} too small for MatMulNBits at {rows or 'several'} rows (needs {needs})"
    return None


def _log2(value: int) -> int:
    return value.bit_length() - 1


def matmulnbits_node(
    emitter: Emitter,
    base: str,
    activation: ir.Value,
    blocks: Int4Blocks,
    bias: np.ndarray | None,
    accuracy_level: int,
) -> tuple[ir.Node, int]:
    """A MatMulNBits (not inserted) computing activation @ W (+ bias); and its stored bytes."""
    packed = matmulnbits_operands(blocks)
    inputs = [
        activation,
        emitter.constant(f"{base}_q4", packed.codes),
        emitter.constant(f"{base}_scales", packed.scales),
        None if packed.zeros is None else emitter.constant(f"{base}_zero_points", packed.zeros),
    ]
    stored = packed.nbytes
    if bias is not None:  # input 5; g_idx (4) stays empty
        inputs += [None, emitter.constant(f"{base}_bias", bias.astype(np.float32))]
        stored += bias.nbytes
    while inputs[-1] is None:
        inputs.pop()
    attributes = _nbits_attributes(blocks, accuracy_level)
    node = emitter.node("MatMulNBits", inputs, attributes, name=f"{base}.int4", domain=MS_DOMAIN)
    use_domain(emitter)
    return node, stored


def nbits_model(
    input_shape: list[int],
    blocks: Int4Blocks,
    bias: np.ndarray | None,
    accuracy_level: int,
    opsets: dict[str, int],
) -> ir.Model:
    """A model of one MatMulNBits on an input of ``input_shape``: to time against the float
    layer (``latency.isolate``). Nothing in it belongs to the model being compressed."""
    packed = matmulnbits_operands(blocks)
    x = ir.Value(name="x", shape=ir.Shape(input_shape), type=ir.TensorType(ir.DataType.FLOAT))
    arrays = [packed.codes, packed.scales, packed.zeros, None, bias]
    inputs = [x] + [
        None if a is None else ir.Value(name=f"c{i}", const_value=ir.Tensor(a, name=f"c{i}"))
        for i, a in enumerate(arrays)
    ]
    while inputs[-1] is None:
        inputs.pop()
    node = ir.node(
        "MatMulNBits", inputs, _nbits_attributes(blocks, accuracy_level), domain=MS_DOMAIN
    )
    return latency.isolate(node, input_shape, {**opsets, MS_DOMAIN: 1})


def _nbits_attributes(blocks: Int4Blocks, accuracy_level: int) -> dict[str, int]:
    k, n = blocks.values.shape
    attributes = {"K": k, "N": n, "bits": 4, "block_size": blocks.block}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return attributes


def replace_node(emitter: Emitter, old: ir.Node, new: ir.Node) -> None:
    """``new`` takes ``old``'s place and output (its name included)."""
    ir.convenience.replace_nodes_and_values(
        emitter.graph, old, [old], [new], [old.outputs[0]], [new.outputs[0]]
    )


def gather_node(emitter: Emitter, node: ir.Node, blocks: Int4Blocks) -> tuple[ir.Node, int]:
    """A GatherBlockQuantized (not inserted) for the Gather ``node`` on a table [V, H] whose
    transpose is ``blocks``; and its stored bytes."""
    packed = gather_operands(blocks)
    base = node.inputs[0].name
    inputs = [
        emitter.constant(f"{base}_q4", packed.codes),
        node.inputs[1],
        emitter.constant(f"{base}_scales", packed.scales),
    ]
    if packed.zeros is not None:
        inputs.append(emitter.constant(f"{base}_zero_points", packed.zeros))
    attributes = {"bits": 4, "block_size": blocks.block, "gather_axis": 0, "quantize_axis": 1}
    new = emitter.node(
        "GatherBlockQuantized",
        inputs,
        attributes,
        name=f"{node.name or base}.int4",
        domain=MS_DOMAIN,
    )
    use_domain(emitter)
    return new, packed.nbytes


def use_domain(emitter: Emitter) -> None:
    if MS_DOMAIN not in emitter.graph.opset_imports:
        emitter.graph.opset_imports[MS_DOMAIN] = 1


def folded_weight(
    emitter: Emitter, weight: ir.Value, blocks: Int4Blocks, axis: int
) -> tuple[ir.Value, int]:
    """The float weight decoded from 4-bit codes by nodes that read only initializers (inserted
    first in the graph); ``blocks`` run along ``axis`` of the 2-D ``weight``. Returns the decoded
    value and the bytes stored for it."""
    packed = folded_operands(blocks)
    decoder = _Decoder(emitter, weight.name)
    codes = decoder.constant("q4", packed.codes[None])  # [1, ceil(K/2), N]
    shifts = decoder.constant("shifts", np.array([0, 4], np.uint8).reshape(2, 1, 1))
    nibbles = decoder.op(
        "Mod",
        decoder.op("BitShift", codes, shifts, direction="RIGHT"),
        decoder.constant("sixteen", np.array(16, np.uint8)),
    )
    k, n = blocks.values.shape
    rows = decoder.op(
        "Reshape",
        decoder.op("Cast", nibbles, to=ir.DataType.FLOAT),
        decoder.constant("rows", np.array([-1, n], np.int64)),
    )
    if padding := blocks.blocks * blocks.block - 2 * len(packed.codes):  # to whole blocks
        pads = np.array([0, 0, padding, 0], np.int64)
        rows = decoder.op("Pad", rows, decoder.constant("pads", pads))
    shape = np.array([blocks.blocks, blocks.block, n], np.int64)
    grouped = decoder.op("Reshape", rows, decoder.constant("blocks", shape))
    if packed.zeros is None:
        zero = decoder.constant("zero", np.array(8.0, np.float32))
    else:
        zero = decoder.op(
            "Cast", decoder.constant("zero_points", packed.zeros), to=ir.DataType.FLOAT
        )
    scaled = decoder.op(
        "Mul", decoder.op("Sub", grouped, zero), decoder.constant("scales", packed.scales)
    )
    rows = decoder.op("Reshape", scaled, decoder.constant("shape", np.array([-1, n], np.int64)))
    if blocks.blocks * blocks.block > k:  # drop the padding
        rows = decoder.op(
            "Slice",
            rows,
            decoder.constant("start", np.array([0], np.int64)),
            decoder.constant("end", np.array([k], np.int64)),
        )
    if axis == 1:
        rows = decoder.op("Transpose", rows, perm=[1, 0])
    decoder.insert()
    rows.name = emitter.namer.fresh(f"{weight.name}.decoded")
    rows.dtype, rows.shape = ir.DataType.FLOAT, ir.Shape(weight.const_value.shape)
    return rows, decoder.stored


class _Decoder:
    """Nodes and constants of one folded weight, named ``{weight}.int4.{kind or op}``."""

    def __init__(self, emitter: Emitter, base: str) -> None:
        self.emitter, self.base = emitter, base
        self.nodes: list[ir.Node] = []
        self.stored = 0

    def constant(self, kind: str, array: np.ndarray) -> ir.Value:
        self.stored += np.asarray(array).nbytes
        return self.emitter.constant(f"{self.base}.int4.{kind}", array)

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = self.emitter.node(
            op_type, list(inputs), attributes, name=f"{self.base}.int4.{op_type}"
        )
        node.outputs[0].name = self.emitter.namer.fresh(f"{node.name}.out")
        self.nodes.append(node)
        return node.outputs[0]

    def insert(self) -> None:
        """Decoders read only initializers, so they go first in the graph (still sorted)."""
        self.emitter.prepend(self.nodes)
