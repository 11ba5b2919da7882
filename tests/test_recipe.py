"""Recipes as data: options, files, coercion, and errors that name the culprit."""

from __future__ import annotations

import pytest

from onnxcompress import Recipe, RecipeError
from onnxcompress.passes.lowrank import LowRank


def test_options_parse_into_steps_and_round_trip():
    recipe = Recipe.from_options(["lowrank:energy=0.9,exclude=/a/*,/b/*,round_to=8", "lowrank"])
    assert recipe.steps[0].options == {"energy": "0.9", "exclude": "/a/*,/b/*", "round_to": "8"}
    first, second = recipe.build()
    assert isinstance(first, LowRank)
    assert first.config == LowRank.Config(energy=0.9, exclude=("/a/*", "/b/*"), round_to=8)
    assert second.config == LowRank.Config()
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_toml_values_keep_their_types(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\nname = "lowrank"\nrank = 4\nmin_saving = 0\n')
    (step,) = Recipe.from_file(path).build()
    assert step.config.rank == 4 and step.config.min_saving == 0.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[passes]]\nname = "lowrank"\nrank = 4.5\n', "rank=4.5: expected an integer"),
        ('[[passes]]\nname = "lowrank"\nrank = true\n', "expected an integer"),
        ("[[passes]]\nrank = 4\n", "pass #1 needs a 'name'"),
        ("passes = 3\n", "expected a list of passes"),
        ("[[passes]\n", "not valid TOML"),
    ],
)
def test_bad_recipe_files(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
        Recipe.from_file(path).build()


def test_bad_option_syntax():
    with pytest.raises(RecipeError, match="is not key=value"):
        Recipe.from_options(["lowrank:energy"])
    with pytest.raises(RecipeError, match="'rank' is given twice"):
        Recipe.from_options(["lowrank:rank=4,energy=0.5,rank=2"])
    with pytest.raises(RecipeError, match="expected name:key=value"):
        Recipe.from_options([":energy=1"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.from_file("/nonexistent/recipe.toml")


def test_none_clears_an_optional_option():
    (step,) = Recipe.from_options(["lowrank:rank=none,energy=0.5"]).build()
    assert step.config.rank is None and step.config.energy == 0.5
