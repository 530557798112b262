"""A captioning run's full model with its data splits, and image features of its photos, for the
tools that study the full model (``tools/beam_settings.py``, ``tools/exit_losses.py``,
``tools/distill_exits.py``).

``load_full_caption_run(run_dir, purpose)`` raises the ``MMExitError`` of a run that does not load
(each tool prints it as its one-line error, exit code 2); ``item_features(model, recipe, items)``
reads a frozen encoder's outputs from the feature cache (``data.cache_dir``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmexit.data.caption_tokenizer import CaptionTokenizer
from mmexit.data.coco import CaptionItem
from mmexit.evaluation.caption_eval import project
from mmexit.models.captioner import Captioner
from mmexit.serve.load import load_captioning
from mmexit.tasks.caption_features import encoder_outputs
from mmexit.tasks.captioning import image_norm, load_splits


@dataclass(frozen=True)
class FullCaptionRun:
    """The full model, its tokenizer, the run's recipe and its train / calib / test items."""

    model: Captioner
    tokenizer: CaptionTokenizer
    recipe: dict
    splits: dict[str, list[CaptionItem]]


def load_full_caption_run(run_dir: str | Path, purpose: str) -> FullCaptionRun:
    """``load_captioning(run_dir, purpose, rule="full")`` and ``load_splits`` of its recipe; an
    ``MMExitError`` (one line; ``purpose`` names what needs a captioning run) otherwise."""
    predictor = load_captioning(run_dir, purpose, rule="full")
    recipe = predictor.recipe
    return FullCaptionRun(predictor.model, predictor.processor, recipe, load_splits(recipe))


def item_features(model: Captioner, recipe: dict, items: Sequence[CaptionItem], projected: bool = True) -> Tensor:
    """The encoder's outputs [N, P, D] for ``items``' photos (a frozen encoder's from the feature
    cache) or, ``projected``, the decoder-width features [N, P, width] (projected in inference mode)."""
    encoded = encoder_outputs(model.encoder, [item.path for item in items], image_norm(recipe),
                              recipe["data"]["cache_dir"], progress=False)
    if not projected:
        return encoded
    with torch.inference_mode():
        return project(model, encoded)
