"""mmexit.calibration.rule_spec.resolve_rule: every accepted spec form, and one-line errors for bad ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from mmexit.calibration.rule_spec import (calibrated_rules, load_calibration, read_calibration, resolve_rule)
from mmexit.errors import RecipeError
from mmexit.exits.confidence import NeverExitRule

sys.path.insert(0, str(Path(__file__).resolve().parent / "serve"))
from serve_helpers import make_tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    folder = make_tiny_run(tmp_path_factory.mktemp("rule_spec") / "run", slow_rule=False)
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["evaluate"]["rules"].append({"name": "pcee", "calibration": {"name": "pcee"}})  # never calibrated
    return folder, recipe


@pytest.mark.parametrize("spec, key, threshold", [
    (None, "maxprob@0.9", 0.9),                      # the run's default point
    ("maxprob@0.9", "maxprob@0.9", 0.9),             # an operating_points.json key
    ("patience@2", "patience@2", 2),
    ("maxprob", "maxprob@0.9", 0.9),                 # a recipe rule at the point the run chose
    ("maxprob@0.75", "maxprob@0.75", 0.75),          # NAME@VALUE
    ("maxprob@threshold=0.8", "maxprob@0.8", 0.8),   # NAME@PARAM=VALUE
    ({"name": "maxprob", "threshold": 0.6}, "maxprob@0.6", 0.6),
])
def test_every_form_gives_a_calibrated_point(run, spec, key, threshold):
    folder, recipe = run
    rule, got = resolve_rule(folder, recipe, spec)
    assert got == key and rule.threshold == threshold and rule.describe() == key


def test_full_and_no_run():
    rule, key = resolve_rule(None, None, "full")
    assert isinstance(rule, NeverExitRule) and key == "full"
    rule, key = resolve_rule(None, None, "maxprob@0.5")
    assert key == "maxprob@0.5" and rule.threshold == 0.5
    assert resolve_rule(None, None, "entropy")[1].startswith("entropy@")
    assert resolve_rule(None, None, {"name": "patience", "threshold": 3})[1] == "patience@3"


@pytest.mark.parametrize("spec, message", [
    ("maxprop@0.9", r"^rule: the run has no rule 'maxprop'; its rules: maxprob, patience, pcee \(or 'full'\); "
                    r"its operating points: maxprob@0.9, patience@2 \(.*operating_points.json\)$"),
    ("maxprob@high", r"^rule: 'maxprob@high': cannot read a number after '@'"),
    ("pcee@0.9", r"^rule: 'pcee@0.9': rule 'pcee' needs a calibration, and .*calibration.json has none for it$"),
    (3, r"^rule: expected a string"),
])
def test_bad_specs_fail_with_one_line(run, spec, message):
    folder, recipe = run
    with pytest.raises(RecipeError, match=message) as error:
        resolve_rule(folder, recipe, spec)
    assert "\n" not in str(error.value)


def test_bad_specs_without_a_run():
    with pytest.raises(RecipeError, match=r"^rule: unknown rule 'maxprop' in 'maxprop@0.9'; allowed: .*maxprob"):
        resolve_rule(None, None, "maxprop@0.9")
    with pytest.raises(RecipeError, match=r"^rule: 'pcee' needs a calibration, and there is no run folder"):
        resolve_rule(None, None, "pcee@0.9")


def test_calibration_json_is_read_in_one_place(run, tmp_path):
    folder, recipe = run
    assert read_calibration(folder)["rules"]["0"]["rule"] == "maxprob"
    assert read_calibration(tmp_path) == {"temperatures": None, "rules": {}}
    rules = calibrated_rules(folder, recipe, strict=False)
    assert load_calibration(folder, rules, strict=False) == [2]  # pcee has no calibration
    with pytest.raises(RecipeError, match=r"^evaluate.rules\[2\]: rule 'pcee' needs the calibrate stage"):
        calibrated_rules(folder, recipe)
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(RecipeError, match="calibration.json: not valid JSON"):
        read_calibration(tmp_path)
    # temperatures saved beside the rules reach the rules that use them
    saved = json.loads((folder / "calibration.json").read_text())
    (tmp_path / "calibration.json").write_text(json.dumps(dict(saved, temperatures=[2.0, 2.0, 2.0, 1.0])))
    rule, _ = resolve_rule(tmp_path, recipe, "maxprob@0.9")
    assert rule.temperatures == [2.0, 2.0, 2.0, 1.0]
