"""Every shipped captioning recipe loads and validates; bad keys fail with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmexit.recipe import load_recipe, validate_recipe
from mmexit.errors import RecipeError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes" / "coco").glob("*.yaml")) + [REPO / "recipes" / "caption_quickstart.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = validate_recipe(load_recipe(path))
    assert recipe["task"] == "captioning"
    assert recipe["evaluate"]["rules"]


def test_bad_keys_fail_clearly():
    path = REPO / "recipes" / "caption_quickstart.yaml"
    with pytest.raises(RecipeError, match=r"evaluate.policy: 'deferd' is not allowed \(did you mean 'deferred'\?\); allowed: propagate, deferred, oracle"):
        validate_recipe(load_recipe(path, ["evaluate.policy=deferd"]))
    with pytest.raises(RecipeError, match=r"model.exit_hed: unknown key \(did you mean 'exit_head'\?\)"):
        validate_recipe(load_recipe(path, ["model.exit_hed=norm"]))
    with pytest.raises(RecipeError, match=r"evaluate.rules\[0\].name: unknown rule 'maxprb'"):
        validate_recipe(load_recipe(path, ["evaluate.rules=[{name: maxprb}]"]))
