"""The predictor base: a trained run folder read back, with its calibrated rule at an operating point.

The run folder holds what a predictor needs: ``recipe.yaml`` (task, max length, decoding
settings), ``model/`` (weights and tokenizer), ``calibration.json`` (each rule's calibrated
parameters) and ``operating_points.json`` (the point each measured rule chose on the calibration
split). By default the predictor uses the run's first measured rule at its chosen point; its
``operating_point`` is the key the run's ``predictions_<split>.jsonl`` uses (``"maxprob@0.9"``).

``rule=`` picks another: a key of ``operating_points.json``; ``"NAME@VALUE"`` (a rule of the recipe,
with its calibration, at another point, e.g. ``"pcee@0.85"`` or ``"pcee@delta=0.85"``); ``"full"``
(every row runs every layer); or a rule spec dict (``{"name": "maxprob", "threshold": 0.8}``).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional, Union

import torch

from mmexit.errors import ModelLoadError, RecipeError
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import NeverExitRule
from mmexit.recipe.language import build_component, validate_component
from mmexit.recipe.loading import load_recipe
from mmexit.recipe.tasks import validate_recipe
from mmexit.stages import CALIBRATION_FILE, OPERATING_POINTS_FILE, build_rules

RuleChoice = Union[None, str, dict]


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


def resolve_rule(folder: Path, recipe: dict, choice: RuleChoice) -> tuple[ExitRule, str]:
    """(rule at its operating point, its key) for ``choice`` (see the module doc)."""
    points_path = folder / OPERATING_POINTS_FILE
    points = json.loads(points_path.read_text()) if points_path.is_file() else {"default": None, "points": []}
    if choice == "full":
        return NeverExitRule(), "full"
    rules = build_rules(recipe)
    if isinstance(choice, dict):
        spec = validate_component(choice, "rule", "rule")
        rule = build_component(spec, "rule", "rule", reserved=("sweep", "calibration"))
        same = [index for index, (_, known) in enumerate(rules) if known.name == rule.name]
        state = _saved_states(folder).get(str(same[0])) if same else None
        if state and state["rule"] == rule.name:
            rule.load_calibration_state(state["state"])
        elif rule.needs_calibration:
            raise RecipeError(f"rule: '{rule.name}' needs a calibration, and the run calibrated no {rule.name} rule")
        return rule, rule.describe()
    if choice is None:
        choice = points["default"]
        if choice is None:
            raise RecipeError(f"{folder}: the run measured no operating point (no {OPERATING_POINTS_FILE}); "
                              "pass rule='NAME@VALUE' or 'full'")
    _load_calibration_lenient(folder, rules)
    for entry in points["points"]:
        if entry["key"] == choice:
            rule = rules[entry["index"]][1].with_threshold(entry["threshold"])
            return rule, rule.describe()
    name, sep, value = str(choice).partition("@")
    if not sep:
        raise RecipeError(f"rule: {choice!r} is not a rule of this run; allowed: "
                          f"{', '.join([e['key'] for e in points['points']] + ['full', 'NAME@VALUE'])}")
    try:
        threshold = float(value.rpartition("=")[2])
    except ValueError:
        raise RecipeError(f"rule: {choice!r}: cannot read a number after '@'") from None
    for _, rule in rules:
        if rule.name == name:
            point = rule.with_threshold(threshold)
            return point, point.describe()
    names = sorted({rule.name for _, rule in rules})
    raise RecipeError(f"rule: the run has no rule '{name}'; its rules: {', '.join(names)} (or 'full')")


def _saved_states(folder: Path) -> dict:
    path = folder / CALIBRATION_FILE
    return json.loads(path.read_text())["rules"] if path.is_file() else {}


def _load_calibration_lenient(folder: Path, rules: list) -> None:
    """Restore calibration.json; rules that need one and have none fail only when used."""
    saved = _saved_states(folder)
    for index, (_, rule) in enumerate(rules):
        state = saved.get(str(index))
        if state and state["rule"] == rule.name:
            rule.load_calibration_state(state["state"])
