"""``mmexit.load(run_dir, rule=None, device=None, weights=True)``: a trained run -> a text or caption predictor.

``weights=False`` reads the run's structure only (exits, labels, tokenizer, calibrated rule; the
model's tensors on the meta device, its weights file never read): for a process that describes a
model but never runs it, like the HTTP process of ``mmexit serve --engine-process``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mmexit.recipe.tasks import task_for
from mmexit.serve.caption_predictor import CaptionPredictor
from mmexit.serve.predictor import Predictor, RuleChoice, default_device, read_run, resolve_rule
from mmexit.serve.text_predictor import TextPredictor


def load(run_dir: Union[str, Path], rule: RuleChoice = None, device: Optional[str] = None,
         weights: bool = True) -> Predictor:
    """A trained run folder -> ``TextPredictor`` or ``CaptionPredictor`` (see the module doc)."""
    folder, recipe = read_run(run_dir)
    device = device or default_device()
    chosen, key = resolve_rule(folder, recipe, rule)
    model, processor = task_for(recipe["task"]).load_for_inference(folder, recipe, device, weights)
    kind = CaptionPredictor if recipe["task"] == "captioning" else TextPredictor
    predictor = kind(folder, recipe, model, processor, chosen, key, device)
    predictor.weights_released = not weights
    return predictor
