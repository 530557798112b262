"""Every shipped recipe validates, and its text components build and run on a tiny random model
of the same depth, so that no recipe rots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmexit.calibration.statistics import ExitStatistics
from mmexit_testing import REPO, SHARED_GLUE, random_batch
from mmexit.recipe import build_component, load_recipe, validate_recipe
from mmexit.inference.encoder import early_exit_forward
from mmexit.models.encoder import MultiExitEncoder
from mmexit.models.loading import tiny_backbone

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))
DEPTHS = {"bert-base-uncased": 12, "bert-large-uncased": 24, "roberta-base": 12, "pypi:minilm-l6": 6,
          "pypi:mpnet-base": 12, "albert-base-v2": 12, "microsoft/deberta-v3-base": 12,
          "distilbert-base-uncased": 6, "answerdotai/ModernBERT-base": 22}
#: backbone name -> the tiny family standing in for it (first match; BERT otherwise)
FAMILIES = ("mpnet", "roberta", "albert", "deberta", "distilbert", "modernbert")


def tiny_family(backbone: str) -> str:
    return next((family for family in FAMILIES if family in backbone.lower()), "bert")


def _overrides(recipe_path: Path) -> list[str]:
    raw = load_recipe(recipe_path)
    overrides = [f"run.output_dir={recipe_path.stem}-test"]
    data = raw.get("data", {})
    if isinstance(data, dict) and data.get("source") == "glue_tsv":
        if not SHARED_GLUE.exists():
            pytest.skip("../shared/data/glue is not beside this checkout")
        overrides.append(f"data.path={SHARED_GLUE}")
    return overrides


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_validates_and_builds(recipe_path):
    first_line = recipe_path.read_text().splitlines()[0]
    assert first_line.startswith("#"), "a recipe starts with a comment giving its launch command"
    assert "tools/run.py" in recipe_path.read_text().split("\n\n")[0] or "run.py" in recipe_path.read_text()[:600]
    recipe = validate_recipe(load_recipe(recipe_path, _overrides(recipe_path)))
    if recipe["task"] != "text_classification":
        return  # captioning recipes are built by tests/captioning
    backbone = recipe["model"]["backbone"]
    layers = recipe["model"]["num_layers"] or DEPTHS.get(backbone, 12)
    family = tiny_family(backbone)
    torch.manual_seed(0)
    model = MultiExitEncoder(tiny_backbone(f"tiny:{family}-{layers}"), 2, recipe["model"]["exits"],
                             recipe["model"]["pooling"])
    loss = build_component(recipe["train"]["loss"], "loss")
    ids, mask = random_batch(8)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(8) % 2}
    value, _ = loss(model, batch, 0.5)
    value.backward()
    model.eval()
    with torch.no_grad():
        calib_logits = model.forward_exits(*random_batch(64, seed=3))
    for spec in recipe["evaluate"]["rules"]:
        rule = build_component(spec, "rule", reserved=("sweep", "calibration"))
        if spec.get("calibration"):
            calibration = build_component(spec["calibration"], "calibration")
            calibration.fit(rule, ExitStatistics.from_logits(calib_logits, torch.randint(0, 2, (64,)), model.exit_layers))
        for threshold in (spec.get("sweep") or rule.default_sweep())[:3]:
            with torch.inference_mode():
                out = early_exit_forward(model, rule.with_threshold(threshold), ids, mask)
            assert out.layers_used.min() >= model.exit_layers[0]
