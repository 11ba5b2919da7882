"""The real pretrained models in ../shared/real through inspect, compress and validate, and the
trained fixtures on real held-out data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from fixtures.mnist import mnist_split
from onnxcompress import compress
from onnxcompress.cli import main
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, run, sha256

# Symbolic sizes each real model needs: a small, realistic input for every one.
REAL_DIMS = {
    "mnist-8.onnx": [],
    "ppocr_mobile_v2_cls.onnx": ["x:0=1", "x:2=48", "x:3=192"],
    "ppocrv4_det.onnx": [
        "p2o.DynamicDimension.0=1",
        "p2o.DynamicDimension.1=160",
        "p2o.DynamicDimension.2=160",
    ],
    "ppocrv4_rec.onnx": ["p2o.DynamicDimension.0=1", "x:2=48", "p2o.DynamicDimension.1=160"],
    "ultraface_rfb320.onnx": [],
}


def _dims(name: str) -> list[str]:
    return [arg for dim in REAL_DIMS.get(name, []) for arg in ("--dim", dim)]


@pytest.mark.parametrize("name", sorted(REAL_DIMS))
def test_inspect_compress_validate_every_real_model(real, tmp_path, name):
    source = real / name
    before = sha256(source)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(source), "--json", *_dims(name)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"] > 0
    out = tmp_path / name
    args = ["compress", str(source), "-o", str(out), "-p", "lowrank:energy=0.9", "--json"]
    result = runner.invoke(main, [*args, "--samples", "2", *_dims(name)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["outputs"], "validation must report fidelity"
    assert report["after"]["file_bytes"] == out.stat().st_size
    result = runner.invoke(
        main,
        ["validate", str(source), str(out), "--samples", "2", "--latency-runs", "2", *_dims(name)],
    )
    assert result.exit_code == 0, result.output
    assert "rel L2" in result.stdout
    assert sha256(source) == before


def test_paddle_metadata_and_constant_weights_survive(real):
    result, report = compress(
        str(real / "ppocrv4_rec.onnx"),
        ["lowrank:energy=0.9,ops=MatMul"],
        options=Options(validate=False),
    )
    assert "character" in result.metadata_props
    assert any("lifted 420 Constant-node" in note for note in report.normalization)
    assert len(report.passes[0].rewritten) >= 3


def _mnist_test_set(real):
    with gzip.open(real / "t10k-images-idx3-ubyte.gz") as stream:
        images = np.frombuffer(stream.read(), np.uint8, offset=16)
    with gzip.open(real / "t10k-labels-idx1-ubyte.gz") as stream:
        labels = np.frombuffer(stream.read(), np.uint8, offset=8)
    return images.reshape(-1, 1, 28, 28).astype(np.float32), labels


def _accuracy_batch1(model, images, labels) -> float:
    import onnxruntime as ort

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else None
    source = proto.SerializeToString() if proto is not None else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    hits = sum(
        int(session.run(None, {name: image[None]})[0].argmax() == label)
        for image, label in zip(images, labels)
    )
    return hits / len(labels)


def test_mnist8_original_accuracy_matches_the_readme_and_survives_lowrank(real):
    images, labels = _mnist_test_set(real)
    assert _accuracy_batch1(real / "mnist-8.onnx", images, labels) == pytest.approx(0.9891)
    compressed, _ = compress(
        str(real / "mnist-8.onnx"), ["lowrank:energy=0.95"], options=Options(validate=False)
    )
    assert _accuracy_batch1(compressed, images, labels) >= 0.9891 - 0.01


def test_lowrank_energy_09_on_trained_mlp_halves_params_within_one_point(tmp_path):
    """Acceptance: factorized layers >= 2x fewer params, <= 1 point drop on held-out data."""
    _, (x_held, y_held) = mnist_split()
    feed = {"input": x_held.reshape(len(x_held), -1)}
    source = FIXTURES / "mnist_mlp.onnx"
    compressed, report = compress(
        str(source), ["lowrank:energy=0.9"], options=Options(validate=False)
    )
    totals = report.passes[0].totals()
    assert totals["layers_rewritten"] >= 2
    assert totals["params_before"] / totals["params_after"] >= 2.0
    accuracy_before = float((run(source, feed)[0].argmax(1) == y_held).mean())
    accuracy_after = float((run(compressed, feed)[0].argmax(1) == y_held).mean())
    assert accuracy_before - accuracy_after <= 0.01


def test_latency_aware_lowrank_on_ultraface_keeps_only_measured_gains(real):
    from fixtures.photos import ultraface_feeds

    feeds = ultraface_feeds(real)
    recipe = [
        "lowrank:scheme=separable,rank=1,min_speedup=1.1",
        "lowrank:scheme=svd,rank=16,round_to=16,ops=Conv,min_speedup=1.1",
    ]
    options = Options(validation_data=feeds[6:])
    _, report = compress(str(real / "ultraface_rfb320.onnx"), recipe, feeds[:6], options=options)
    for stage in report.passes:
        assert all(layer.detail["speedup"] >= 1.1 for layer in stage.rewritten)
        timed = [layer.reason for layer in stage.layers if "as fast alone" in (layer.reason or "")]
        assert all("(min_speedup 1.1)" in reason for reason in timed)
    # the RFB block's three dilated branches end in one 1×1 conv: their pointwise halves merge
    merged = [layer for layer in report.passes[0].rewritten if "merged_into" in layer.detail]
    assert {layer.detail["merged_into"] for layer in merged} <= {"Conv(310)"}
    scores, boxes = report.validation.outputs
    assert scores.rel_l2 < 0.1 and scores.top1_agreement > 0.99 and boxes.rel_l2 < 0.05


def test_torch_export_with_a_dynamic_batch_needs_no_dim(real, tmp_path):
    """Issue 11: EfficientNet-Lite1 (torch export, input [batch, 3, 240, 240]) is inspected
    and compressed without --dim; the batch defaults to 1."""
    source = real / "efficientnet_lite1.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(source)])
    assert result.exit_code == 0, result.output
    assert "batch axis (batch) set to 1" in result.output
    out = tmp_path / "eff.onnx"
    args = ["compress", str(source), "-o", str(out), "-p", "lowrank:energy=0.9", "--samples", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "pass lowrank" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(REAL_DIMS), "efficientnet_lite1.onnx"])
def test_default_qdq_runs_and_validates_on_every_real_model(real, tmp_path, name):
    """Issue 12: default qdq once ended in exit 3 on EfficientNet-Lite1 (an int64 shape path
    got a QuantizeLinear). Every real model: exit 0, validated, no Q/DQ on a non-float."""
    out = tmp_path / name
    args = ["compress", str(real / name), "-o", str(out), "-p", "qdq", "--samples", "2"]
    result = CliRunner().invoke(main, [*args, *_dims(name), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["outputs"]
    model = ir.load(out)
    quantized = [n.inputs[0] for n in model.graph if n.op_type == "QuantizeLinear"]
    assert quantized and all(v.dtype in (ir.DataType.FLOAT, None) for v in quantized)


@pytest.mark.slow
def test_lite1_int8_agrees_with_float_on_real_images(real):
    """EfficientNet-Lite1 calibrated on 10 ImageNet images agrees with float on 20 others,
    with its Pads folded into the convs and its ReLU6 clamps absorbed."""
    from fixtures.imagenet import feeds, imagenet100

    images, _ = imagenet100(str(real))
    path = str(real / "efficientnet_lite1.onnx")
    quantized, _ = compress(path, ["qdq"], feeds(images[:10]), options=Options())
    ops = [n.op_type for n in quantized.graph]
    assert "Pad" not in ops and "Clip" not in ops
    assert ops.count("Conv") == 64
    reference = np.concatenate([run(path, f)[0] for f in feeds(images[50:70], 10)])
    candidate = np.concatenate([run(quantized, f)[0] for f in feeds(images[50:70], 10)])
    assert np.mean(reference.argmax(-1) == candidate.argmax(-1)) >= 0.9
