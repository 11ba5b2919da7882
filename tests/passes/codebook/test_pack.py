"""codebook: index packing round trips and the decoder graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress import compress
from onnxcompress.passes.codebook.pack import PackedIndices, layout_for, pack, unpack
from tests.passes.codebook.models import NO_VALIDATE, decoded_weight, matmul_model


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    groups=st.integers(1, 4),
    count=st.integers(1, 70),
    opset=st.sampled_from([13, 21]),
    seed=st.integers(0, 2**16),
)
def test_packing_round_trips_for_every_bits(bits, groups, count, opset, seed):
    indices = np.random.default_rng(seed).integers(0, 1 << bits, (groups, count)).astype(np.uint8)
    layout = layout_for(bits, opset)
    stored = pack(indices, bits, layout)
    np.testing.assert_array_equal(unpack(stored, bits, layout, count), indices)
    # exactly `bits` per index; each row (each plane's row) padded to whole bytes only
    if layout == "fields":
        assert stored.nbytes == groups * -(-count // (8 // bits))
    elif layout == "planes":
        assert stored.nbytes == bits * groups * -(-count // 8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 70])
def test_packed_indices_round_trip_for_every_bits_and_layout(bits, opset, count):
    """Every bits value in every layout it can take (fields, planes, uint8, uint4), with and
    without padding: what the decoder graph unpacks is what was fitted."""
    indices = np.random.default_rng(bits * count).integers(0, 1 << bits, (3, count))
    packed = PackedIndices.of(indices.astype(np.uint8), bits, opset)
    assert packed.layout == layout_for(bits, opset)
    np.testing.assert_array_equal(packed.unpack(), indices)
    assert packed.padded >= count


@pytest.mark.parametrize("bits", range(1, 9))
def test_decoder_graph_unpacks_like_numpy_for_every_bits(bits):
    """The graph decoder (onnxruntime) gives the same weight as the numpy decode."""
    w = np.random.default_rng(bits).standard_normal((37, 21))  # odd sizes: padding
    proto = matmul_model(w)
    result, report = compress(
        proto, [f"codebook:bits={bits},min_size=1,granularity=tensor"], options=NO_VALIDATE
    )
    model = ir.from_proto(result)
    decoded = decoded_weight(model)
    error = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert error == pytest.approx(report.passes[0].layers[0].weight_error, rel=1e-4, abs=1e-6)
    assert len(np.unique(decoded)) <= 1 << bits


def test_native_uint4_storage_at_opset_21():
    w = np.random.default_rng(1).standard_normal((128, 32))
    proto = matmul_model(w, opset=21)
    result, report = compress(proto, ["codebook:bits=4,granularity=channel"], options=NO_VALIDATE)
    layer = report.passes[0].layers[0]
    assert layer.detail["layout"] == "uint4"
    model = ir.from_proto(result)
    stored = next(v for v in model.graph.initializers.values() if v.name.endswith("indices"))
    assert stored.const_value.dtype == ir.DataType.UINT4
    proto_indices = [t for t in ir.to_proto(model).graph.initializer if t.name == stored.name]
    assert len(proto_indices[0].raw_data) == 128 * 32 // 2  # two indices a byte on disk
    decoded = decoded_weight(model)
    error = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert error == pytest.approx(layer.weight_error, rel=1e-4)
