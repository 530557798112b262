"""Accuracy control with a guarantee (guaranteed PCEE) and the control check (library + tools/control.py).

The synthetic task knows its truth: 3 exits of a two-class problem, each with a known accuracy
curve P(correct | confidence) (over-confident exits, as fine-tuned ones are). The population
accuracy of a calibrated policy is the mean of the true accuracy curve at the chosen exit over a
large sample, so "the target was missed" is measured without test-set noise.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmexit.statistics.accuracy_control import (CONFIDENCE_LEVELS, accuracy_p_value, errors_at_levels,
                                                  lower_bound, max_certifiable_delta)
from mmexit.calibration.ltt import LTTCalibration
from mmexit.calibration.pcee import PCEECalibration
from mmexit.calibration.statistics import ExitStatistics
from mmexit.errors import RecipeError
from mmexit.evaluation.control import (METHODS, ExitOutputs, Split, control_table_markdown, load_exit_outputs,
                                       ltt_agree_grid, run_control_check, save_exit_outputs)
from mmexit.exits.confidence import MaxProbRule
from mmexit.exits.pcee import PCEERule
from mmexit.inference.exit_loop import simulate_exits
from mmexit.recipe.language import build_component

REPO = Path(__file__).resolve().parents[2]
SLOPES = (0.80, 0.85, 0.95)  # accuracy = 0.5 + slope * (confidence - 0.5): every exit over-confident


def synthetic_task(n: int, seed: int, slopes=SLOPES):
    """(logits [3, n, 2], labels [n], true accuracy at each exit [3, n]) of the synthetic task."""
    generator = torch.Generator().manual_seed(seed)
    easiness = torch.rand(n, generator=generator)
    confidence, truth = [], []
    for index, slope in enumerate(slopes):
        sharp, centre = (2.0, 3.5, 5.0)[index], (0.55, 0.4, 0.25)[index]
        c = 0.5 + 0.5 * torch.sigmoid(4 * sharp * (easiness - centre) + torch.randn(n, generator=generator))
        confidence.append(c)
        truth.append((0.5 + slope * (c - 0.5)).clamp(max=1.0))
    confidence, truth = torch.stack(confidence), torch.stack(truth)
    correct = torch.rand(n, generator=generator).unsqueeze(0) < truth  # one draw: exits' errors correlate
    labels = torch.randint(0, 2, (n,), generator=generator)
    predicted = torch.where(correct, labels, 1 - labels)
    logit = torch.log(confidence / (1 - confidence))
    zeros = torch.zeros_like(logit)
    logits = torch.where(predicted.unsqueeze(-1) == 1, torch.stack([zeros, logit], -1), torch.stack([logit, zeros], -1))
    return logits, labels, truth


@pytest.fixture(scope="module")
def population():
    logits, labels, truth = synthetic_task(8_000, seed=12345)
    return logits, truth


def population_accuracy(rule, population) -> tuple[float, float]:
    """(expected accuracy, layer speed-up) of ``rule`` on the synthetic population (exits at layers 4, 8, 12)."""
    logits, truth = population
    exit_index = simulate_exits(rule, logits)
    accuracy = float(truth.gather(0, exit_index.unsqueeze(0)).mean())
    layers = torch.tensor([4, 8, 12])[exit_index]
    return accuracy, 12 * exit_index.numel() / float(layers.sum())


def calibrated(logits, labels, **options) -> PCEERule:
    rule = PCEERule()
    PCEECalibration(**options).fit(rule, ExitStatistics.from_logits(logits, labels, [4, 8, 12]))
    return rule


# ----------------------------------------------------------------------------------- statistics
def test_p_value_and_bounds_agree():
    # 40 errors out of 400 certify delta = 0.85 (accuracy 0.9, ~2.8 standard errors above)
    assert accuracy_p_value(40, 400, 0.85) < 0.01
    assert accuracy_p_value(60, 400, 0.85) > 0.4
    best = max_certifiable_delta(40, 400, 0.1)
    assert 0.87 < best < 0.9
    assert accuracy_p_value(40, 400, best - 1e-6) <= 0.1 + 1e-6
    assert accuracy_p_value(40, 400, best + 1e-3) > 0.1
    # Wilson is a little less conservative than Clopper-Pearson; both below the point estimate
    cp, wilson = lower_bound(36, 40, 0.1, "clopper_pearson"), lower_bound(36, 40, 0.1, "wilson")
    assert cp < wilson < 0.9
    assert lower_bound(0, 10, 0.1) == 0.0 and lower_bound(5, 0, 0.1) == 0.0


def test_counted_errors_match_the_rule_decisions():
    """What the calibration counts per level is what the rule then does: both scores, several deltas."""
    logits, labels, _ = synthetic_task(600, seed=3)
    correct = logits.argmax(-1) == labels
    for score in ("confidence", "bin_accuracy"):
        rule = calibrated(logits, labels, guarantee="ltt", score=score, alpha=0.2)
        for delta in (0.7, 0.75, 0.8):
            point = rule.with_threshold(delta)
            _, level = point.certified()
            exit_index = simulate_exits(point, logits)
            wrong = int((~correct.gather(0, exit_index.unsqueeze(0))).sum())
            if level is None:
                assert exit_index.eq(2).all()
                continue
            if score == "confidence":  # the whole split is the test part
                assert wrong == rule.ltt["errors"][rule.ltt["levels"].index(level)]
            else:  # the scores the calibration tested are the rule's table lookups
                scores = rule.table_scores(point_confidence(logits)[:-1])
                assert errors_at_levels(scores, correct, [level]) == [wrong]


def point_confidence(logits):
    return logits.softmax(-1).amax(-1)


# ------------------------------------------------------------------------- the guarantee itself
def test_guaranteed_pcee_keeps_its_promise_where_the_paper_misses(population):
    """100+ calibration draws of 400 samples: P(population accuracy < delta) <= alpha (+ slack)."""
    delta, alpha, draws = 0.80, 0.1, 100
    missed = {"pcee": 0, "pcee-ltt": 0, "pcee-ltt-table": 0, "pcee-cp": 0}
    speed = {name: 0.0 for name in missed}
    options = {"pcee": {}, "pcee-ltt": {"guarantee": "ltt", "alpha": alpha},
               "pcee-ltt-table": {"guarantee": "ltt", "alpha": alpha, "score": "bin_accuracy"},
               "pcee-cp": {"guarantee": "bins", "alpha": alpha}}
    for draw in range(draws):
        logits, labels, _ = synthetic_task(400, seed=1000 + draw)
        confidence, correct = logits.softmax(-1).amax(-1), logits.argmax(-1) == labels
        for name, option in options.items():
            rule = PCEERule()
            PCEECalibration(**option).fit_arrays(rule, confidence, correct, 2)
            accuracy, speedup = population_accuracy(rule.with_threshold(delta), population)
            missed[name] += accuracy < delta
            speed[name] += speedup / draws
    rates = {name: count / draws for name, count in missed.items()}
    # binomial slack: the sd of a rate of 0.1 over 100 draws is 0.03
    assert rates["pcee-ltt"] <= alpha + 0.07, rates
    assert rates["pcee-ltt-table"] <= alpha + 0.07, rates
    assert rates["pcee-cp"] <= alpha + 0.07, rates
    assert rates["pcee"] >= 0.4, rates  # the paper's point estimates miss the target most of the time
    assert all(value > 1.0 for value in speed.values()), speed  # the guarantee still exits early


def test_unreachable_target_falls_back_to_the_full_model_and_warns():
    logits, labels, _ = synthetic_task(400, seed=7)
    full_accuracy = float((logits[-1].argmax(-1) == labels).float().mean())
    rule = calibrated(logits, labels, guarantee="ltt", alpha=0.1)
    point = rule.with_threshold(min(full_accuracy + 0.02, 0.99))
    assert point.target_unreachable()
    assert simulate_exits(point, logits).eq(2).all()
    assert "target unreachable" in point.warning and "falls back to the full model" in point.warning
    assert point.describe().startswith("pcee-ltt(alpha=0.1)@delta=")
    # just below the full model's accuracy: the full model is certified only if far enough below it;
    # at a modest delta the rule exits early and has nothing to warn about
    easy = rule.with_threshold(0.7)
    assert not easy.target_unreachable() and easy.warning is None
    assert simulate_exits(easy, logits).lt(2).any()
    # the bound variant also runs the full model when the final exit's own bound misses delta
    bins = calibrated(logits, labels, guarantee="bins", alpha=0.1).with_threshold(full_accuracy)
    assert bins.target_unreachable() and simulate_exits(bins, logits).eq(2).all()
    assert "unreachable" in bins.warning


def test_certified_full_model_without_any_early_exit_warns_without_unreachable():
    # exit 0 is always wrong and fully confident: no early exit can be certified, the full model is
    labels = torch.zeros(300, dtype=torch.long)
    logits = torch.zeros(3, 300, 2)
    logits[0, :, 1] = 8.0
    logits[1, :, 1] = 8.0
    logits[2, :, 0] = 2.0
    rule = calibrated(logits, labels, guarantee="ltt", alpha=0.1).with_threshold(0.9)
    assert not rule.target_unreachable()
    assert simulate_exits(rule, logits).eq(2).all()
    assert "no early exit is certified" in rule.warning


def test_calibration_state_round_trip_for_every_guarantee():
    logits, labels, _ = synthetic_task(500, seed=11)
    for options in ({"guarantee": "ltt"}, {"guarantee": "ltt", "score": "bin_accuracy", "fit_fraction": 0.4, "seed": 3},
                    {"guarantee": "bins", "bound": "wilson", "alpha": 0.05}, {}):
        rule = calibrated(logits, labels, **options)
        reloaded = PCEERule()
        reloaded.load_calibration_state(json.loads(json.dumps(rule.calibration_state())))
        for delta in rule.default_sweep():
            a, b = rule.with_threshold(delta), reloaded.with_threshold(delta)
            assert simulate_exits(a, logits).tolist() == simulate_exits(b, logits).tolist(), (options, delta)
            assert a.describe() == b.describe() and a.warning == b.warning
            assert a.target_unreachable() == b.target_unreachable()


def test_recipe_syntax_builds_the_calibration():
    calibration = build_component({"name": "pcee", "guarantee": "ltt", "alpha": 0.1}, "calibration", "c", reserved=())
    assert isinstance(calibration, PCEECalibration) and calibration.guarantee == "ltt"
    with pytest.raises(RecipeError, match="guarantee 'lt' is not allowed"):
        PCEECalibration(guarantee="lt")
    with pytest.raises(RecipeError, match="alpha must be in"):
        PCEECalibration(guarantee="ltt", alpha=1.5)


def test_ltt_agree_in_the_check_is_the_existing_ltt_calibration():
    logits, labels, _ = synthetic_task(400, seed=5)
    split = Split.of(logits, labels)
    fitted = METHODS["ltt-agree"].fit(split, 0.1)
    full_lb = lower_bound(int(split.correct[-1].sum()), 400, 0.05)
    for delta in (0.7, 0.75, 0.8):
        rule, unreachable = fitted.at(delta)
        reference = MaxProbRule()
        LTTCalibration(epsilon=full_lb - delta, delta=0.05, grid=ltt_agree_grid()).fit(reference, ExitStatistics.from_logits(
            logits, labels, [4, 8, 12]))
        assert not unreachable and rule.threshold == reference.threshold


# ------------------------------------------------------------------------------ the control check
@pytest.fixture()
def exit_outputs_file(tmp_path) -> Path:
    calib_logits, calib_labels, _ = synthetic_task(300, seed=21)
    test_logits, test_labels, _ = synthetic_task(700, seed=22)
    path = tmp_path / "run" / "exit_outputs.safetensors"
    path.parent.mkdir()
    save_exit_outputs(path, ExitOutputs(calib_logits, calib_labels, test_logits, test_labels, [4, 8, 12],
                                        "synthetic", "accuracy"))
    return path


def _tool():
    spec = importlib.util.spec_from_file_location("mmexit_control_tool", REPO / "tools" / "control.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_library_and_markdown(exit_outputs_file):
    outputs = load_exit_outputs(exit_outputs_file.parent)
    report = run_control_check(outputs, deltas=[0.75, 0.8], splits=8, progress=False)
    assert {row.method for row in report.rows} == set(METHODS) and len(report.rows) == 2 * len(METHODS)
    for row in report.rows:
        assert 0.0 <= row.violation_rate <= 1.0 and row.mean_speedup >= 1.0 and row.splits == 8
    text = control_table_markdown(exit_outputs_file, deltas=[0.8], splits=3)
    assert "| delta | method | guarantee | mean acc |" in text and "| 0.8 | pcee-ltt |" in text


def test_oracle_reference_is_the_fastest_max_prob_level_within_alpha_on_the_test_parts(exit_outputs_file):
    """The oracle row: recomputed by brute force from the same re-splits, it is the fastest level whose
    violation rate <= alpha; it is never slower than any method that also stays within alpha."""
    from mmexit.evaluation.control import ORACLE, TOLERANCE

    outputs = load_exit_outputs(exit_outputs_file)
    report = run_control_check(outputs, deltas=[0.72, 0.8], splits=6, alpha=0.2, seed=3, progress=False,
                               calib_size=250)
    assert report.calib_size == 250 and report.test_size == 750 and [o.method for o in report.oracle] == [ORACLE] * 2
    logits = torch.cat([outputs.calib_logits, outputs.test_logits], 1)
    labels = torch.cat([outputs.calib_labels, outputs.test_labels])
    generator = torch.Generator().manual_seed(3)
    tests = [torch.randperm(1000, generator=generator)[250:] for _ in range(6)]
    for oracle in report.oracle:
        best = None
        for level in [float("inf")] + ltt_agree_grid():
            accuracy, speedup = [], []
            for rows in tests:
                exits = simulate_exits(MaxProbRule(level), logits[:, rows])
                accuracy.append(float((logits[:, rows][exits, torch.arange(rows.numel())].argmax(-1) == labels[rows])
                                      .float().mean()))
                speedup.append(12 * rows.numel() / float(torch.tensor([4, 8, 12])[exits].sum()))
            rate = sum(a < oracle.delta - TOLERANCE for a in accuracy) / len(accuracy)
            if rate <= 0.2 and (best is None or sum(speedup) / 6 > best[0]):
                best = (sum(speedup) / 6, sum(accuracy) / 6, rate)
        assert oracle.mean_speedup == pytest.approx(best[0], rel=1e-6)
        assert oracle.mean_accuracy == pytest.approx(best[1], abs=1e-6) and oracle.violation_rate == best[2]
        for row in report.rows:
            if row.delta == oracle.delta and row.violation_rate <= 0.2 and row.method == "maxprob@delta":
                assert row.mean_speedup <= oracle.mean_speedup + 1e-9
    markdown = report.markdown()
    assert f"| 0.72 | *{ORACLE}* |" in markdown and "a reference, not a method" in markdown


def test_calib_size_out_of_range_is_one_line_error(exit_outputs_file, capsys):
    assert _tool().main([str(exit_outputs_file), "--splits", "2", "--quiet", "--calib-size", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmexit: error: --calib-size must be in [2, 999] (the pool has 1000 samples), got 1000"


def test_cli_prints_the_table_and_json(exit_outputs_file, capsys):
    tool = _tool()
    assert tool.main([str(exit_outputs_file.parent), "--splits", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "### Accuracy control check: synthetic" in out and "| pcee |" in out and "| maxprob@delta |" in out
    assert tool.main([str(exit_outputs_file), "--splits", "3", "--json", "--deltas", "0.7,0.8", "--quiet",
                      "--methods", "pcee", "pcee-ltt"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["deltas"] == [0.7, 0.8] and payload["splits"] == 3 and payload["num_layers"] == 12
    assert {row["method"] for row in payload["rows"]} == {"pcee", "pcee-ltt"}
    assert set(payload["rows"][0]) >= {"delta", "mean_accuracy", "violation_rate", "mean_abs_gap", "mean_speedup",
                                        "unreachable_rate"}


def test_cli_bad_inputs_are_one_line_errors(exit_outputs_file, tmp_path, capsys):
    tool = _tool()
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"calib.logits": torch.zeros(3, 4, 2)}, str(other), metadata={"exit_layers": "[1, 2, 3]"})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    cases = [([str(tmp_path / "missing")], "no such run folder"),
             ([str(tmp_path)], "no exit_outputs.safetensors in this folder"),
             ([str(other)], "lacks the tensors calib.labels, test.logits, test.labels"),
             ([str(garbage)], "safetensors"),
             ([str(exit_outputs_file), "--alpha", "2"], "--alpha must be in (0, 1)"),
             ([str(exit_outputs_file), "--deltas", "0.8", "x"], "--deltas: 'x' is not a number"),
             ([str(exit_outputs_file), "--methods", "nope"], "unknown method(s) nope")]
    for argv, message in cases:
        assert tool.main(argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmexit: error: ") and message in err[0], (argv, err)


def test_cli_exit_status_from_a_shell(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "control.py"), str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("mmexit: error: ") and len(result.stderr.strip().splitlines()) == 1


def test_control_table_prints_one_row_per_delta_with_the_speedup_ratio():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("control_table", Path(__file__).parents[2] / "tools" / "control_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"mean_accuracy": 0.9, "violation_rate": 0.1, "mean_speedup": 2.0}
    report = {"task": "t", "calib_size": 10, "test_size": 10, "first_exit_accuracy": 0.8, "full_accuracy": 0.9,
              "alpha": 0.1, "splits": 5, "deltas": [0.8, 0.85],
              "rows": [{**row, "delta": d, "method": m} for d in (0.8, 0.85) for m in ("pcee", "pcee-ltt")]}
    report["rows"][1]["mean_speedup"] = 3.0  # pcee-ltt at delta 0.8
    lines = module.table(report).splitlines()
    assert lines[-2].startswith("| 0.800 | 90.0 / 10% / 2.00x | - | - | 90.0 / 10% / 3.00x") and lines[-2].endswith("| 1.50 |")
    assert lines[-1].endswith("| 1.00 |")
