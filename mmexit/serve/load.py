"""``mmexit.load(run_dir, rule=None, device=None)``: a trained run -> a text or caption predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mmexit.recipe.tasks import task_for
from mmexit.serve.caption_predictor import CaptionPredictor
from mmexit.serve.predictor import Predictor, RuleChoice, default_device, read_run, resolve_rule
from mmexit.serve.text_predictor import TextPredictor


def load(run_dir: Union[str, Path], rule: RuleChoice = None, device: Optional[str] = None) -> Predictor:
    """A trained run folder -> ``TextPredictor`` or ``CaptionPredictor`` (see the module doc)."""
    folder, recipe = read_run(run_dir)
    device = device or default_device()
    chosen, key = resolve_rule(folder, recipe, rule)
    model, processor = task_for(recipe["task"]).load_for_inference(folder, recipe, device)
    if recipe["task"] == "captioning":
        return CaptionPredictor(folder, recipe, model, processor, chosen, key, device)
    return TextPredictor(folder, recipe, model, processor, chosen, key, device)
