"""``mmexit.load(run_dir, rule=None, device=None, weights=True, dtype=None)``: a trained run -> a text or caption
predictor.

``dtype`` (float32, bfloat16, float16 on a GPU, int8 on CPU; ``mmexit.models.precision``): the precision
the model runs at; by default the run's ``evaluate.dtype``, the precision its rules were calibrated at.

``weights=False`` reads the run's structure only (exits, labels, tokenizer, calibrated rule; the
model's tensors on the meta device, its weights file never read): for a process that describes a
model but never runs it, like the HTTP process of ``mmexit serve --engine-process``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mmexit.errors import ModelLoadError
from mmexit.models.precision import apply_precision, check_dtype
from mmexit.recipe.tasks import task_for
from mmexit.serve.caption_predictor import CaptionPredictor
from mmexit.serve.predictor import Predictor, RuleChoice, default_device, read_run, resolve_rule
from mmexit.serve.text_predictor import TextPredictor


def load(run_dir: Union[str, Path], rule: RuleChoice = None, device: Optional[str] = None,
         weights: bool = True, dtype: Optional[str] = None) -> Predictor:
    """A trained run folder -> ``TextPredictor`` or ``CaptionPredictor`` (see the module doc)."""
    folder, recipe = read_run(run_dir)
    device = device or default_device()
    dtype = dtype or recipe["evaluate"]["dtype"]
    check_dtype(dtype, device, "dtype")
    chosen, key = resolve_rule(folder, recipe, rule)
    model, processor = task_for(recipe["task"]).load_for_inference(folder, recipe, device, weights)
    if weights:
        model = apply_precision(model, dtype, device, "dtype")
    model.mmexit_dtype = dtype
    kind = CaptionPredictor if recipe["task"] == "captioning" else TextPredictor
    predictor = kind(folder, recipe, model, processor, chosen, key, device)
    predictor.weights_released = not weights
    return predictor


def load_captioning(run_dir: Union[str, Path], purpose: str, **options) -> CaptionPredictor:
    """``load(run_dir, **options)`` of a captioning run; one ModelLoadError line naming the run's task
    and ``purpose`` (e.g. "this bench decodes captions") otherwise."""
    predictor = load(run_dir, **options)
    if predictor.task != "captioning":
        raise ModelLoadError(f"{run_dir}: a {predictor.task} run; {purpose}")
    return predictor
