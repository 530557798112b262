"""The shipped recipe of each new backbone family runs end to end (train -> calibrate -> evaluate ->
report -> mmexit.load) through the text pipeline, on a tiny random model of the recipe's depth and
a tiny SST-2 folder: the hub weights are swapped for ``tiny:FAMILY-DEPTH`` (offline)."""

from __future__ import annotations

import json

import pytest

from mmexit_testing import REPO, make_glue, one_torch_thread
from mmexit.recipe import load_recipe
from mmexit.runner import main

RECIPES = {
    "albert": "albert-base_beem.yaml",
    "deberta": "deberta-v3-base_sweet.yaml",
    "distilbert": "distilbert-base_pabee.yaml",
    "modernbert": "modernbert-base_joint_maxprob.yaml",
}
DEPTHS = {"albert": 12, "deberta": 12, "distilbert": 6, "modernbert": 22}
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.mark.parametrize("family", sorted(RECIPES))
def test_family_recipe_runs_on_its_tiny_config(family, tmp_path):
    recipe = REPO / "recipes" / "glue" / RECIPES[family]
    rules = {spec["name"] for spec in load_recipe(recipe)["evaluate"]["rules"]}
    out = tmp_path / "out"
    code = main([
        str(recipe), f"run.output_dir={out}", "run.log_with=none", f"data.path={make_glue(tmp_path)}",
        f"model.backbone=tiny:{family}-{DEPTHS[family]}", "model.max_length=32",
        "data.max_train_samples=16", "data.max_eval_samples=16", "train.epochs=1", "train.batch_size=8",
        "evaluate.timing_batch_sizes=[8]", "evaluate.timing_samples=8", "evaluate.timing_repeats=1",
    ])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    measured = {row["method"].split("+")[-1] for row in rows if not row["simulated"] and row["method"] != "full"}
    assert measured == rules
    assert all(row["layer_speedup"] >= 1.0 for row in rows)

    import mmexit

    predictor = mmexit.load(out, device="cpu")
    assert predictor.model.num_layers == DEPTHS[family]
    results = predictor.predict(["good film number 3", "bad film number 4"])
    assert len(results) == 2 and all(1 <= r["exit_layer"] <= DEPTHS[family] for r in results)
