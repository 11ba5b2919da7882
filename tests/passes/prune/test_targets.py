"""prune with a global target: channels chosen by reconstruction, per-group probes, the
allocation, the measured speed-up and the refusal when a target is out of reach."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import RecipeError, ToleranceExceeded, compress
from onnxcompress.cli import main
from onnxcompress.errors import BadData
from onnxcompress.passes.prune.reconstruction import Sink, collect, removal_order
from onnxcompress.passes.prune.targets import Option, _sweep
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES

NO_VALIDATE = Options(validate=False)


def _matmul_sink(weight: np.ndarray) -> tuple[ir.Model, ir.Node]:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="sink")],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return model, next(iter(model.graph))


def test_a_duplicated_channel_goes_first_and_the_refit_absorbs_it():
    """Channel 3 repeats channel 0: the refit moves its weight onto channel 0 for free, so it
    goes before channel 2, whose weights are the smallest but whose input is its own."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 4)).astype(np.float32)
    x[:, 3] = x[:, 0]
    weight = np.array([[1.0, 1.0], [1.0, -1.0], [0.3, 0.3], [1.0, 0.5]], np.float32)
    model, node = _matmul_sink(weight)
    sink = Sink(node, [np.array([i]) for i in range(4)], intercept=False)
    collect(model, [sink], [{"x": x}], max_rows=4096, seed=0)
    refitted = {}
    order = removal_order([sink], 4, [1], lambda count, fed: refitted.update(fed))
    assert order[0] in (0, 3)
    kept = [i for i in range(4) if i != order[0]]
    # exact but for the small ridge that keeps G⁻¹ finite
    np.testing.assert_allclose(x[:, kept] @ refitted["W"][kept], x @ weight, atol=1e-2)
    assert not refitted["W"][order[0]].any()


def test_the_allocation_takes_the_cheapest_error_per_unit_saved():
    options = {
        1: [Option(0, 0.0, 0.0), Option(4, 0.01, 10.0), Option(8, 0.5, 20.0)],
        2: [Option(0, 0.0, 0.0), Option(4, 0.001, 10.0), Option(8, 0.002, 20.0)],
    }
    assert _sweep(options, 20.0) == {1: 0, 2: 2}  # all from the robust group
    assert _sweep(options, 30.0) == {1: 1, 2: 2}
    assert _sweep(options, 0.0) == {1: 0, 2: 0}
    assert _sweep(options, 1e9) == {1: 2, 2: 2}  # out of reach: the most there is


def _cnn_data(samples: int = 64) -> list[dict[str, np.ndarray]]:
    from fixtures.mnist import mnist_split

    (train_x, _), _ = mnist_split()
    return [{"input": train_x[i : i + 16]} for i in range(0, samples, 16)]


@pytest.mark.parametrize("target", ["target_macs=0.5", "target_params=0.6"])
def test_a_share_target_is_reached_and_the_allocation_reported(target):
    kind, value = target.removeprefix("target_").split("=")
    _, report = compress(
        str(FIXTURES / "mnist_cnn.onnx"), [f"prune:{target}"], _cnn_data(), options=NO_VALIDATE
    )
    before, after = report.before, report.after
    kept = after.macs / before.macs if kind == "macs" else after.params / before.params
    assert kept <= float(value) + 0.01
    prune = report.passes[0]
    assert prune.allocation and not prune.missed
    assert any(row["kept"] < row["channels"] for row in prune.allocation)
    assert "allocation" in report.to_text() and "allocation" in report.to_dict()["passes"][0]


def test_an_unreachable_latency_target_is_refused_with_the_measurement():
    with pytest.raises(ToleranceExceeded, match=r"measured .*x faster, target 50"):
        compress(
            str(FIXTURES / "mnist_cnn.onnx"),
            ["prune:target_latency=50"],
            _cnn_data(32),
            options=NO_VALIDATE,
        )


def test_cli_refuses_an_unreachable_target_with_exit_1_and_writes_nothing(tmp_path):
    data = tmp_path / "cal.npz"
    np.savez(data, input=np.concatenate([f["input"] for f in _cnn_data(32)]))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "compress",
            str(FIXTURES / "mnist_cnn.onnx"),
            "-o",
            str(out),
            "-p",
            "prune:target_latency=50",
            "--calibration",
            str(data),
            "--report",
            str(report),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "target 50" in result.stderr and "nothing written" in result.stderr
    assert "allocation" in result.stdout
    assert not out.exists()
    assert json.loads(report.read_text())["gates"]["passed"] is False


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("prune:target_latency=1.2,target_macs=0.5", "give one of"),
        ("prune:target_latency=0.5", "target_latency"),
        ("prune:target_params=0", "target_params"),
    ],
)
def test_bad_targets_are_refused_before_any_work(setting, message):
    with pytest.raises(RecipeError, match=message):
        compress(str(FIXTURES / "mnist_cnn.onnx"), [setting], options=NO_VALIDATE)


def test_a_target_without_any_data_says_so():
    with pytest.raises(BadData, match="needs calibration data"):
        compress(str(FIXTURES / "mnist_cnn.onnx"), ["prune:target_macs=0.5"], options=NO_VALIDATE)


def test_reconstruction_order_keeps_the_cnn_closer_than_filter_norms():
    """The trained CNN at 40% of every group, refit off: filters chosen by reconstruction
    leave a smaller output error on held-out digits than the smallest-norm ones."""
    from fixtures.mnist import mnist_split
    from tests.passes.prune.measures import output_error

    _, (held_x, _) = mnist_split()
    held = [{"input": held_x[:256]}]
    source = onnx.load(FIXTURES / "mnist_cnn.onnx")
    errors = {}
    for order in ("l1", "reconstruction"):
        setting = f"prune:ratio=0.4,importance={order},repair=none"
        model, _ = compress(
            str(FIXTURES / "mnist_cnn.onnx"), [setting], _cnn_data(), options=NO_VALIDATE
        )
        errors[order] = output_error(source, ir.to_proto(model), held)
    assert errors["reconstruction"] < errors["l1"], errors


def test_ultraface_macs_target_spares_the_sensitive_groups(real):
    """A real detector: the MACs target is met, the allocation differs from group to group
    (not one ratio), and the held-out photos' outputs stay close."""
    from fixtures.photos import ultraface_feeds
    from tests.passes.prune.measures import output_error

    feeds = ultraface_feeds(real)
    source = str(real / "ultraface_rfb320.onnx")
    model, report = compress(
        source, ["prune:target_macs=0.7,round_to=8"], feeds[:4], options=NO_VALIDATE
    )
    assert report.after.macs <= 0.7 * report.before.macs
    kept_shares = {row["kept"] / row["channels"] for row in report.passes[0].allocation}
    assert 1.0 in kept_shares and len(kept_shares) > 2
    assert output_error(onnx.load(source), ir.to_proto(model), feeds[6:]) < 0.1
