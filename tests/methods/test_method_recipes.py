"""Every shipped paper/comparison recipe validates against the schema (with a tiny backbone)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmexit.recipe import build_component, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes" / "glue").glob("*.yaml")) + sorted((REPO / "recipes" / "compare").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data" / "glue"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates_and_builds(path, monkeypatch):
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is missing (the recipes read GLUE from ../shared/data/glue)")
    monkeypatch.chdir(REPO)
    text = path.read_text()
    assert text.startswith("#") and "tools/run.py " + str(path.relative_to(REPO)) in text.split("\ntask:")[0]
    recipe = validate_recipe(load_recipe(path, ["model.backbone=tiny:bert"]))
    build_component(recipe["train"]["loss"], "loss", "train.loss")
    for index, spec in enumerate(recipe["evaluate"]["rules"]):
        rule = build_component(spec, "rule", f"evaluate.rules[{index}]", reserved=("sweep", "calibration"))
        if spec.get("calibration"):
            build_component(spec["calibration"], "calibration", "calibration")
        for point in spec.get("sweep") or rule.default_sweep():
            rule.with_threshold(point) if not rule.needs_calibration else None
