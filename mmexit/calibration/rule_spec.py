"""A run's calibrated rules, and the one way a rule spec becomes a calibrated rule at an operating point.

A run folder keeps each rule's calibrated parameters in ``calibration.json`` (read here and nowhere
else) and the point each measured rule chose in ``operating_points.json``. ``resolve_rule`` turns a
rule spec into ``(rule, key)``; the spec may be:

- ``None``: the run's default operating point (the first entry of ``operating_points.json``);
- ``"full"``: every row runs every layer (``NeverExitRule``, key ``"full"``);
- a key of ``operating_points.json`` (``"maxprob@0.9"``, ``"pcee@delta=0.85"``, ``"beem-A@slack=0.1"``);
- ``"NAME"``: the recipe's rule NAME at the point the run chose for it, else at its own threshold;
- ``"NAME@VALUE"`` or ``"NAME@PARAM=VALUE"``: the recipe's rule NAME, with its calibration, at VALUE
  (NAME: the rule's name, ``pcee``, or its label before '@', ``pcee-ltt(alpha=0.1)``);
- a rule spec dict (``{"name": "maxprob", "threshold": 0.8}``), calibrated like the recipe's rule of that name.

Without a run (``folder`` and ``recipe`` None), ``"NAME"`` and ``"NAME@VALUE"`` build any rule of
the component table, uncalibrated; rules that need a calibration are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from mmexit.errors import RecipeError
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import NeverExitRule
from mmexit.recipe.components import COMPONENTS
from mmexit.recipe.language import build_component, validate_component

CALIBRATION_FILE = "calibration.json"
OPERATING_POINTS_FILE = "operating_points.json"
#: keys of a recipe's rule spec read by the stages, not by the rule's class
RULE_RESERVED = ("sweep", "calibration")

RuleChoice = Union[None, str, dict]
Rules = list[tuple[dict, ExitRule]]


def build_rules(recipe: dict) -> Rules:
    """The recipe's rules (``evaluate.rules``), uncalibrated, each with its spec (for sweep / calibration)."""
    return [(spec, build_component(spec, "rule", f"evaluate.rules[{i}]", reserved=RULE_RESERVED))
            for i, spec in enumerate(recipe["evaluate"]["rules"])]


def read_calibration(folder: Optional[Path]) -> dict:
    """``calibration.json`` of a run folder: {"split", "temperatures", "rules": {"<index>": {"rule", "state"}}};
    no file (or no folder): no rules."""
    path = Path(folder) / CALIBRATION_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {"temperatures": None, "rules": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None


def read_operating_points(folder: Optional[Path]) -> dict:
    """``operating_points.json`` of a run folder: {"default": key | None, "points": [{"index", "rule",
    "threshold", "key", "spec"}]}; no file: no points."""
    path = Path(folder) / OPERATING_POINTS_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {"default": None, "points": []}
    return json.loads(path.read_text())


def _restore(rule: ExitRule, state: dict, temperatures) -> None:
    rule.load_calibration_state(state)
    if temperatures and hasattr(rule, "temperatures") and rule.temperatures is None:
        rule.temperatures = temperatures


def load_calibration(folder: Optional[Path], rules: Rules, strict: bool = True) -> list[int]:
    """Restore a run's ``calibration.json`` into ``rules`` (matched by index and name), with its
    temperatures. Returns the indices of rules that need a calibration and found none; ``strict``:
    raise one line naming the first of them instead."""
    saved = read_calibration(folder)
    missing = []
    for index, (_, rule) in enumerate(rules):
        state = saved["rules"].get(str(index))
        if state and state["rule"] == rule.name:
            _restore(rule, state["state"], saved.get("temperatures"))
        elif rule.needs_calibration:
            missing.append(index)
    if strict and missing:
        where = Path(folder) / CALIBRATION_FILE if folder is not None else CALIBRATION_FILE
        raise RecipeError(f"evaluate.rules[{missing[0]}]: rule '{rules[missing[0]][1].name}' needs the calibrate "
                          f"stage (no calibration for it in {where})")
    return missing


def calibrated_rules(folder: Optional[Path], recipe: dict, strict: bool = True) -> Rules:
    """The recipe's rules with the run folder's calibration restored (``load_calibration``)."""
    rules = build_rules(recipe)
    load_calibration(folder, rules, strict)
    return rules


def _label(rule: ExitRule) -> str:
    return rule.describe().partition("@")[0]


def _calibrated(rule: ExitRule, index: Optional[int], saved: dict, spec: str, where: str) -> ExitRule:
    """``rule`` with the saved calibration of the recipe's rule ``index``; one line when it needs one and has none."""
    state = saved["rules"].get(str(index)) if index is not None else None
    if state and state["rule"] == rule.name:
        _restore(rule, state["state"], saved.get("temperatures"))
    elif rule.needs_calibration:
        raise RecipeError(f"rule: {spec!r}: rule '{rule.name}' needs a calibration, and {where} has none for it")
    return rule


def resolve_rule(folder: Optional[Path], recipe: Optional[dict], choice: RuleChoice) -> tuple[ExitRule, str]:
    """(calibrated rule at its operating point, its key) for a rule spec (see the module doc)."""
    if choice == "full":
        return NeverExitRule(), "full"
    if recipe is None:
        return _uncalibrated(choice)
    folder = Path(folder) if folder is not None else None
    calibration_file = f"{folder / CALIBRATION_FILE}" if folder is not None else CALIBRATION_FILE
    points_file = f"{folder / OPERATING_POINTS_FILE}" if folder is not None else OPERATING_POINTS_FILE
    points, saved = read_operating_points(folder), read_calibration(folder)
    rules = build_rules(recipe)
    if isinstance(choice, dict):
        spec = validate_component(choice, "rule", "rule")
        rule = build_component(spec, "rule", "rule", reserved=RULE_RESERVED)
        same = [index for index, (_, known) in enumerate(rules) if known.name == rule.name]
        rule = _calibrated(rule, same[0] if same else None, saved, rule.describe(), calibration_file)
        return rule, rule.describe()
    if choice is None:
        choice = points["default"]
        if choice is None:
            raise RecipeError(f"{folder}: the run measured no operating point (no {points_file}); "
                              "pass rule='NAME@VALUE' or 'full'")
    if not isinstance(choice, str):
        raise RecipeError(f"rule: expected a string, a rule spec dict or None, got {choice!r}")
    for entry in points["points"]:
        if entry["key"] == choice:
            index = entry["index"]
            rule = _calibrated(rules[index][1], index, saved, choice, calibration_file)
            point = rule.with_threshold(entry["threshold"])
            return point, point.describe()
    name, sep, value = choice.partition("@")
    matches = [index for index, (_, rule) in enumerate(rules) if name in (rule.name, _label(rule))]
    if not matches:
        keys = [entry["key"] for entry in points["points"]]
        names = sorted({rule.name for _, rule in rules})
        raise RecipeError(f"rule: the run has no rule '{name}'; its rules: {', '.join(names)} (or 'full'); "
                          f"its operating points: {', '.join(keys) or 'none'} ({points_file})")
    index = matches[0]
    rule = _calibrated(rules[index][1], index, saved, choice, calibration_file)
    if sep:
        point = rule.with_threshold(_number(choice, value))
    else:  # the point the run chose for this rule, else the recipe's threshold
        chosen = [entry["threshold"] for entry in points["points"] if entry["index"] == index]
        point = rule.with_threshold(chosen[0]) if chosen else rule
    return point, point.describe()


def _number(choice: str, value: str) -> float:
    try:
        return float(value.rpartition("=")[2])
    except ValueError:
        raise RecipeError(f"rule: {choice!r}: cannot read a number after '@' (expected NAME@VALUE, "
                          "e.g. maxprob@0.9 or pcee@delta=0.85)") from None


def _uncalibrated(choice: RuleChoice) -> tuple[ExitRule, str]:
    """No run: a rule of the component table at the spec's point, uncalibrated."""
    if choice is None:
        raise RecipeError("rule: no run folder, so no default operating point; pass NAME@VALUE or 'full'")
    if isinstance(choice, dict):
        spec = validate_component(choice, "rule", "rule")
    elif isinstance(choice, str):
        name = choice.partition("@")[0]
        if name not in COMPONENTS["rule"]:
            raise RecipeError(f"rule: unknown rule {name!r} in {choice!r}; allowed: "
                              f"{', '.join(sorted(COMPONENTS['rule']))} (as NAME or NAME@VALUE), or 'full'")
        spec = {"name": name}
    else:
        raise RecipeError(f"rule: expected a string, a rule spec dict or None, got {choice!r}")
    rule = build_component(spec, "rule", "rule", reserved=RULE_RESERVED)
    if isinstance(choice, str) and "@" in choice:
        rule = rule.with_threshold(_number(choice, choice.partition("@")[2]))
    if rule.needs_calibration:
        raise RecipeError(f"rule: {rule.name!r} needs a calibration, and there is no run folder to read one from; "
                          "use a rule without one (e.g. maxprob@0.9) or a trained run")
    return rule, rule.describe()
