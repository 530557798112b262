"""The predictor base: a trained run folder read back, with its calibrated rule at an operating point.

The run folder holds what a predictor needs: ``recipe.yaml`` (task, max length, decoding
settings), ``model/`` (weights and tokenizer), ``calibration.json`` (each rule's calibrated
parameters) and ``operating_points.json`` (the point each measured rule chose on the calibration
split). By default the predictor uses the run's first measured rule at its chosen point; its
``operating_point`` is the key the run's ``predictions_<split>.jsonl`` uses (``"maxprob@0.9"``).

``rule=`` picks another: a key of ``operating_points.json``; ``"NAME"`` (a rule of the recipe at
its chosen point); ``"NAME@VALUE"`` (a rule of the recipe, with its calibration, at another point,
e.g. ``"pcee@0.85"`` or ``"pcee@delta=0.85"``); ``"full"`` (every row runs every layer); or a rule
spec dict (``{"name": "maxprob", "threshold": 0.8}``): ``mmexit.calibration.rule_spec.resolve_rule``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Union

import torch

from mmexit.calibration.rule_spec import RuleChoice, resolve_rule
from mmexit.errors import ModelLoadError
from mmexit.exits.base import ExitRule
from mmexit.recipe.loading import load_recipe
from mmexit.recipe.tasks import validate_recipe

__all__ = ["Predictor", "RuleChoice", "default_device", "read_run", "resolve_rule"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """A trained run with its rule. Subclasses add ``predict`` (text) or ``caption`` (images)."""

    def __init__(self, run_dir: Path, recipe: dict, model, processor, rule: ExitRule, operating_point: str,
                 device: str) -> None:
        self.run_dir, self.recipe = run_dir, recipe
        self.model, self.processor = model, processor
        self.rule, self.operating_point = rule, operating_point
        self.device = device
        self.weights_released = False

    @property
    def task(self) -> str:
        return self.recipe["task"]

    def check_weights(self) -> None:
        """One line instead of a meta-device error when a predictor without weights is asked to run."""
        if self.weights_released:
            raise ModelLoadError(f"{self.run_dir}: this predictor holds the model's structure only (loaded with "
                                 f"weights=False, or its weights were released); load the run with weights to run it")

    def release_weights(self) -> None:
        """Drop the model's weights, keep its structure (exit layers, labels, config): for the HTTP
        process of ``mmexit serve --engine-process``, whose engines run in a worker with their own
        copy. The tensors move to the meta device, so a forward pass afterwards fails loudly."""
        self.model.to("meta")
        self.weights_released = True
        gc.collect()

    def describe(self) -> dict:
        """What is loaded: task, operating point, exits, device, precision."""
        return {"run_dir": str(self.run_dir), "task": self.task, "operating_point": self.operating_point,
                "exit_layers": list(self.model.exit_layers), "num_layers": int(self.model.num_layers),
                "device": self.device, "dtype": getattr(self.model, "mmexit_dtype", "float32")}


def read_run(run_dir: Union[str, Path]) -> tuple[Path, dict]:
    """The run folder and its validated recipe, or one line saying what is missing."""
    folder = Path(run_dir)
    if (folder / "recipe.yaml").is_file() is False and folder.name == "model":
        folder = folder.parent
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (expected a trained mmexit run folder)")
    for needed in ("recipe.yaml", "model"):
        if not (folder / needed).exists():
            raise ModelLoadError(f"{folder}: not a trained mmexit run (no {needed}); train it with mmexit run RECIPE")
    return folder, validate_recipe(load_recipe(folder / "recipe.yaml"))
