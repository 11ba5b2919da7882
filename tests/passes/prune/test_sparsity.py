"""sparsity: per-layer and global magnitude thresholds, the masked least-squares repair, and
the old spelling ``prune:mode=sparsity`` from the command line and from recipe files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from onnxcompress import Recipe, RecipeError, compress
from onnxcompress.passes import Prune, Sparsity
from onnxcompress.pipeline import RECIPE_METADATA_KEY, Options
from tests.conftest import run
from tests.passes.prune.channel_models import COUPLING_CASES, build, feed_for
from tests.passes.prune.measures import calibration_feeds, initializers, output_error

REPO = Path(__file__).resolve().parents[3]

NO_VALIDATE = Options(validate=False)


def test_sparsity_per_layer_zeroes_the_smallest_weights():
    proto = build(COUPLING_CASES["conv_bn"])
    result, report = compress(proto, ["sparsity:ratio=0.5"], options=NO_VALIDATE)
    before, after = initializers(proto), initializers(result)
    for name in ("W1", "W2"):
        zeroed = after[name] == 0
        assert zeroed.sum() == math.floor(0.5 * before[name].size)
        assert np.abs(before[name][zeroed]).max() <= np.abs(before[name][~zeroed]).min()
    np.testing.assert_array_equal(after["P1"], before["P1"])  # BN is not a linear weight
    assert "achieved sparsity 0.50" in report.passes[0].notes[0]


def test_sparsity_global_threshold_and_zero_ratio():
    proto = build(COUPLING_CASES["conv_bn"])
    result, report = compress(proto, ["sparsity:ratio=0.6,scope=global"], options=NO_VALIDATE)
    assert "achieved sparsity" in report.passes[0].notes[0]
    before, after = initializers(proto), initializers(result)
    everything = np.concatenate([np.abs(before[n]).ravel() for n in ("W1", "W2")])
    zeros = sum(int((after[n] == 0).sum()) for n in ("W1", "W2"))
    assert zeros == math.floor(0.6 * everything.size)
    result, _ = compress(proto, ["sparsity:ratio=0"], options=NO_VALIDATE)
    feed = feed_for(proto)
    np.testing.assert_allclose(run(result, feed)[0], run(proto, feed)[0], atol=1e-5)


def test_sparsity_repair_keeps_zeros_and_cuts_error():
    proto = build(COUPLING_CASES["gemm"])
    calibration, held_out = calibration_feeds(proto, 16), calibration_feeds(proto, 4)[2:]
    plain, _ = compress(proto, ["sparsity:ratio=0.5"], options=NO_VALIDATE)
    setting = "sparsity:ratio=0.5,repair=lstsq,select=magnitude"
    fitted, _ = compress(proto, [setting], calibration=calibration, options=NO_VALIDATE)
    for name, weight in initializers(plain).items():
        if name.startswith("W"):
            np.testing.assert_array_equal(initializers(fitted)[name] == 0, weight == 0)
    assert output_error(proto, fitted, held_out) < 0.7 * output_error(proto, plain, held_out)


def test_activation_selection_keeps_the_count_per_output_and_beats_magnitude():
    proto = build(COUPLING_CASES["gemm"])
    calibration, held_out = calibration_feeds(proto, 16), calibration_feeds(proto, 4)[2:]
    results = {}
    for select in ("magnitude", "activation"):
        setting = f"sparsity:ratio=0.7,repair=lstsq,select={select},steps=3"
        results[select], _ = compress(
            proto, [setting], calibration=calibration, options=NO_VALIDATE
        )
    moved = 0
    for name, weight in initializers(results["magnitude"]).items():
        if name.startswith("W"):
            chosen = initializers(results["activation"])[name]
            assert (chosen == 0).sum() == (weight == 0).sum()
            moved += not np.array_equal(chosen == 0, weight == 0)
    assert moved  # other weights were chosen
    errors = {k: output_error(proto, v, held_out) for k, v in results.items()}
    assert errors["activation"] < errors["magnitude"]


def test_activation_selection_on_the_trained_mlp_keeps_accuracy():
    from fixtures.mnist import mnist_split

    (x_train, _), (x_held, y_held) = mnist_split()
    calibration = [{"input": x_train[i : i + 500].reshape(500, -1)} for i in range(0, 8000, 500)]
    model = REPO / "fixtures" / "mnist_mlp.onnx"
    accuracy = {}
    for select in ("magnitude", "activation"):
        setting = f"sparsity:ratio=0.95,scope=global,repair=lstsq,damping=0.01,select={select}"
        result, _ = compress(str(model), [setting], calibration=calibration, options=NO_VALIDATE)
        logits = run(result, {"input": x_held.reshape(len(x_held), -1)})[0]
        accuracy[select] = float((logits.argmax(1) == y_held).mean())
    # measured: 0.9775 against 0.968 (float 0.9815)
    assert accuracy["activation"] >= accuracy["magnitude"] + 0.005
    assert accuracy["activation"] >= 0.9815 - 0.008


# --- the old spelling: prune:mode=sparsity ----------------------------------------------------
@pytest.mark.parametrize(
    ("text", "config"),
    [
        ("prune:mode=sparsity,ratio=0.5", Sparsity.Config(ratio=0.5)),
        ("prune:mode=sparsity,scope=global,repair=auto", Sparsity.Config(scope="global")),
        (
            "prune:mode=sparsity,repair=lstsq,max_rows=64",
            Sparsity.Config(repair="lstsq", max_rows=64),
        ),
        ("prune:mode=filters,ratio=0.2", Prune.Config(ratio=0.2)),
    ],
)
def test_mode_option_builds_the_pass_it_names(text, config):
    """From the command line: the step is stored under the pass's own name, without mode."""
    recipe = Recipe.from_options([text])
    (built,) = recipe.build()
    assert built.config == config
    assert recipe.steps[0].name == built.name and "mode" not in recipe.steps[0].options


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_mode_in_recipe_files_builds_sparsity(tmp_path, suffix):
    path = tmp_path / f"r.{suffix}"
    entry = {"name": "prune", "mode": "sparsity", "ratio": 0.5, "repair": "auto"}
    if suffix == "json":
        path.write_text(json.dumps({"passes": [entry]}))
    else:
        path.write_text(
            '[[passes]]\nname = "prune"\nmode = "sparsity"\nratio = 0.5\nrepair = "auto"\n'
        )
    recipe = Recipe.from_file(path)
    (built,) = recipe.build()
    assert isinstance(built, Sparsity) and built.config == Sparsity.Config(ratio=0.5)
    assert recipe.to_dict() == {"passes": [{"name": "sparsity", "ratio": 0.5, "repair": "none"}]}


def test_mode_sparsity_gives_the_same_model_and_names_the_pass_sparsity():
    proto = build(COUPLING_CASES["conv_bn"])
    new, _ = compress(proto, ["sparsity:ratio=0.5"], options=NO_VALIDATE)
    old, old_report = compress(proto, ["prune:mode=sparsity,ratio=0.5"], options=NO_VALIDATE)
    assert old.SerializeToString(deterministic=True) == new.SerializeToString(deterministic=True)
    assert [p.name for p in old_report.passes] == ["sparsity"]
    stored = {p.key: p.value for p in old.metadata_props}[RECIPE_METADATA_KEY]
    assert json.loads(stored) == {"passes": [{"name": "sparsity", "ratio": "0.5"}]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune:mode=sparsity,importance=l2", "option 'importance' is for filter pruning only"),
        ("prune:mode=sparsity,target_macs=0.5", "option 'target_macs' is for filter pruning"),
        ("prune:mode=sparsity,repair=bias", "repair='bias' is for filter pruning only"),
        ("prune:mode=sparsity,bogus=1", "sparsity: unknown option 'bogus'"),
        ("prune:mode=channels", "mode='channels': must be filters or sparsity"),
        ("prune:scope=global", "prune: unknown option 'scope'"),
        ("sparsity:repair=bias", "repair='bias': must be none or lstsq"),
    ],
)
def test_options_that_do_not_fit_the_pass_are_rejected_naming_them(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_options([text]).build()
