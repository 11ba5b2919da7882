"""optimize: a size target under a tolerance, on the MNIST MLP fixture with real digits; the
chosen recipe replays to the same bytes; a tolerance nothing meets writes nothing and exits 1;
targets and tolerances it cannot take are one line and exit 2 before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures.mnist import mnist_split
from onnxcompress.errors import BadOption
from onnxcompress.optimize import Target, Tolerance, optimize
from onnxcompress.pipeline import Options
from tests.conftest import FIXTURES, sha256
from tests.test_cli import assert_one_clear_line, invoke

MLP = FIXTURES / "mnist_mlp.onnx"


@pytest.fixture(scope="module")
def digits(tmp_path_factory, real):
    """Calibration (128 digits) and held-out (256 other digits) feeds as .npz files."""
    folder = tmp_path_factory.mktemp("digits")
    (images, _), _ = mnist_split(real)
    flat = images.reshape(len(images), -1).astype(np.float32)
    np.savez(folder / "calibration.npz", input=flat[:128])
    np.savez(folder / "held_out.npz", input=flat[128:384])
    return folder / "calibration.npz", folder / "held_out.npz"


def test_a_size_target_is_met_within_the_tolerance_and_the_recipe_replays_it(tmp_path, digits):
    calibration, held_out = digits
    output, report = tmp_path / "small.onnx", tmp_path / "optimize.json"
    before = sha256(MLP)
    result = invoke(
        "optimize", MLP, "-o", output, "--target", "size=8x", "--tolerance", "agreement=0.97",
        "--calibration", calibration, "--data", held_out, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sha256(MLP) == before
    data = json.loads(report.read_text())
    chosen = [trial for trial in data["trials"] if trial["chosen"]]
    assert len(chosen) == 1 and chosen[0]["recipe"] == data["chosen"]
    assert 8 * 0.95 <= chosen[0]["ratio"] <= 8 * 1.05
    assert chosen[0]["min_agreement"] >= 0.97
    explored = sorted(trial["ratio"] for trial in data["trials"] if trial["role"] == "explored")
    assert explored[0] < 6 < 10 < explored[-1]  # the trade-off spans the target
    assert (tmp_path / "small.tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    replay = tmp_path / "replay.onnx"
    recipe = tmp_path / "small.recipe.json"
    again = invoke(
        "compress", MLP, "-o", replay, "--recipe", recipe, "--calibration", calibration,
        "--no-validate",
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert sha256(replay) == sha256(output)


def test_a_tolerance_no_recipe_meets_writes_nothing_and_exits_1(tmp_path, digits):
    calibration, held_out = digits
    output = tmp_path / "small.onnx"
    result = invoke(
        "optimize", MLP, "-o", output, "--target", "size=8x", "--tolerance", "rel=0.0001",
        "--calibration", calibration, "--data", held_out, "--no-explore",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "tolerance missed" in result.stdout
    assert "no recipe meets size=8x" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--target", "latency=1.5x"], "latency targets are not built yet"),
        (["--target", "size=eight"], "give size=RATIOx"),
        (["--target", "size=0.5x"], "at least 1x"),
        (["--target", "size=8x", "--tolerance", "drop=0.01"], "needs --metric"),
        (["--target", "size=8x", "--tolerance", "speed=2"], "give agreement=A"),
        (["--target", "size=8x", "--metric", "nowhere.py:score"], "no such file nowhere.py"),
        (["--target", "size=8x", "--metric", "score"], "give FILE.py:FUNCTION"),
        (["--target", "size=8x", "--tolerance", "agreement=most"], "is not a number"),
    ],
)
def test_targets_and_tolerances_it_cannot_take_are_one_line_and_exit_2(tmp_path, args, fragment):
    output = tmp_path / "small.onnx"
    result = invoke("optimize", MLP, "-o", output, *args)
    assert_one_clear_line(result, 2, fragment)
    assert not output.exists()


def test_the_output_may_not_be_the_input(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(MLP.read_bytes())
    result = invoke("optimize", model, "-o", model, "--target", "size=8x")
    assert result.exit_code == 2 and "the output is the input" in result.output
    assert sha256(model) == sha256(MLP)


def test_targets_and_tolerances_parse():
    assert Target.parse("size=8x") == Target(ratio=8.0)
    assert Target.parse("SIZE = 2.5X") == Target(ratio=2.5)
    assert Target.parse("bytes=1000") == Target(nbytes=1000)
    assert Target(ratio=8.0).size_option(1.5) == "12x"
    assert Target(nbytes=1000).size_option(2.0) == "500"
    tolerance = Tolerance.parse(["agreement=0.99", "rel=0.02"])
    assert (tolerance.gates.min_agreement, tolerance.gates.max_rel_error) == (0.99, 0.02)
    assert Tolerance.parse([]) == Tolerance()
    assert Tolerance.parse(["drop=0.25"]).metric_floor == 0.75
    with pytest.raises(BadOption):
        Target.parse("bytes=-3")


METRIC = """
import numpy as np

def digit_agreement(reference, candidate):
    return float(np.mean(reference[0].argmax(-1) == candidate[0].argmax(-1)))

def broken(reference, candidate):
    raise ValueError("not this one")
"""


def test_a_user_metric_judges_and_ranks_the_candidates(tmp_path, digits):
    """``--metric FILE.py:FUNCTION`` scores each trial against the original; its floor is a
    gate; a metric file that fails to load is one line and exit 2."""
    calibration, held_out = digits
    script = tmp_path / "metric.py"
    script.write_text(METRIC)
    output, report = tmp_path / "small.onnx", tmp_path / "optimize.json"
    result = invoke(
        "optimize", MLP, "-o", output, "--target", "size=8x", "--metric",
        f"{script}:digit_agreement", "--tolerance", "metric=0.97", "--calibration",
        calibration, "--data", held_out, "--no-explore", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    scores = {" ".join(t["recipe"]): t["score"] for t in data["trials"]}
    chosen = " ".join(data["chosen"])
    assert scores[chosen] == max(scores.values()) and scores[chosen] >= 0.97
    # each candidate is scored as compressed: the sparse one agrees less than the chosen one
    assert min(scores.values()) < scores[chosen]
    assert "digit_agreement" in result.stdout
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('missing dependency')\n")
    failed = invoke("optimize", MLP, "-o", output, "--target", "size=8x", "--metric",
                    f"{bad}:score")  # fmt: skip
    assert_one_clear_line(failed, 2, "cannot load", "missing dependency")


def test_a_metric_floor_nothing_meets_refuses_through_the_api(digits):
    calibration, held_out = digits

    def never(reference, candidate):
        return 0.0

    model, result = optimize(
        str(MLP), Target(ratio=4.0), str(calibration), Tolerance(metric_floor=0.5),
        Options(validation_data=str(held_out)), explore=False, metric=never,
    )  # fmt: skip
    assert model is None and result.chosen is None
    assert all("never 0.0000 < 0.5" in t.failures[0] for t in result.trials)


def test_the_metric_sees_each_candidate_as_compressed_even_after_an_opset_upgrade(real):
    """mnist-8 (opset 8) is upgraded before the codebook runs: the metric must be given the
    upgraded, compressed model's outputs, not the model as loaded."""
    (images, _), _ = mnist_split(real)
    feeds = [{"Input3": image[None].astype(np.float32)} for image in images[:8]]
    differences = []

    def changed(reference, candidate):
        differences.append(float(np.abs(reference[0] - candidate[0]).max()))
        return 1.0

    model, result = optimize(
        str(real / "mnist-8.onnx"), Target(ratio=3.0), feeds, None, Options(),
        explore=False, metric=changed,
    )  # fmt: skip
    assert model is not None and result.chosen is not None
    assert max(differences) > 0


def test_without_held_out_data_a_quarter_of_the_calibration_judges_and_all_of_it_replays(
    tmp_path, digits
):
    """No --data: the candidates are fitted to three quarters of the calibration feeds and
    judged on the rest; the chosen recipe is then made again on all of them, so that
    ``compress --recipe`` with the same calibration replays it to the same bytes."""
    calibration, _ = digits
    output = tmp_path / "small.onnx"
    result = invoke(
        "optimize", MLP, "-o", output, "--target", "size=4x", "--calibration", calibration,
        "--no-explore",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fitted to the first 12 calibration feeds and judged on the last 4" in result.stdout
    replay = tmp_path / "replay.onnx"
    recipe = tmp_path / "small.recipe.json"
    again = invoke("compress", MLP, "-o", replay, "--recipe", recipe, "--calibration",
                   calibration, "--no-validate")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert sha256(replay) == sha256(output)
