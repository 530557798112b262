"""BEEM: agreement accumulation, restart on disagreement, threshold selection (hand-computed cases)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmexit.calibration.statistics import ExitStatistics
from mmexit.calibration.beem import BEEMCalibration
from mmexit.errors import CalibrationError
from mmexit.exits.base import ExitView
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.beem import BEEMRule, beem_scores, select_thresholds


def _logits_for(confidences, predictions, classes=3):
    """Two-class-free construction: logits whose softmax max is c at class yhat (rows = 1)."""
    rows = []
    for c, y in zip(confidences, predictions):
        rest = (1 - c) / (classes - 1)
        probs = torch.full((classes,), rest)
        probs[y] = c
        rows.append(probs.log())
    return torch.stack(rows).unsqueeze(1)  # [M, 1, C]


def test_score_accumulates_on_agreement_and_restarts_with_own_score():
    # weights w = [0.5, 1, 2], c = [0.8, 0.6, 0.9], yhat = [1, 1, 0]
    confidence = torch.tensor([[0.8], [0.6], [0.9]])
    prediction = torch.tensor([[1], [1], [0]])
    weights = torch.tensor([0.5, 1.0, 2.0])
    scores = beem_scores(confidence, prediction, weights, "own")
    # S1 = 0.4; agree -> S2 = 0.4 + 0.6 = 1.0; disagree -> S3 = 2 * 0.9 = 1.8 (paper's figure)
    torch.testing.assert_close(scores[:, 0], torch.tensor([0.4, 1.0, 1.8]))
    zero = beem_scores(confidence, prediction, weights, "zero")
    torch.testing.assert_close(zero[:, 0], torch.tensor([0.4, 1.0, 0.0]))  # official code's restart


@pytest.mark.parametrize("restart,expected", [("own", [0.4, 1.0, 1.8]), ("zero", [0.4, 1.0, 0.0])])
def test_rule_state_follows_the_same_scores(restart, expected):
    rule = BEEMRule(restart=restart, weights=[0.5, 1.0, 2.0])
    rule.alphas = [math.inf, math.inf, 0.0]
    logits = _logits_for([0.8, 0.6, 0.9], [1, 1, 0])
    state = rule.start(1, torch.device("cpu"))
    for index in range(3):
        rule.decide(ExitView(logits[index], index, 3), state)
        assert float(state["score"][0]) == pytest.approx(expected[index], abs=1e-5)


def test_exit_at_first_score_above_alpha():
    rule = BEEMRule(weights=[0.5, 1.0, 2.0])
    rule.alphas = [0.5, 0.9, 0.0]
    # row 0: S = 0.4 (< 0.5), 1.0 (>= 0.9) -> exit 1; row 1: c1 = 0.9 -> S1 = 0.45, disagree at 2 -> 0.6 -> last
    logits = torch.cat([_logits_for([0.8, 0.6, 0.9], [1, 1, 0]), _logits_for([0.9, 0.6, 0.5], [2, 1, 1])], dim=1)
    assert simulate_exits(rule, logits).tolist() == [1, 2]


def test_select_thresholds_hand_case():
    # exit 0 scores (descending) 0.9 0.8 0.7 0.6, correct T T F T; final exit correct T T T F -> error 0.25
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [1.0, 1.0, 1.0, 1.0]])
    correct = torch.tensor([[True, True, False, True], [True, True, True, False]])
    # cuts: 1 -> 0/1, 2 -> 0/2, 3 -> 1/3 > 0.25, 4 -> 1/4 = 0.25: the smallest feasible alpha is 0.6
    assert select_thresholds(scores, correct, slack=0.0) == [pytest.approx(0.6), 0.0]
    # a stricter target (0.24) allows only the first two
    assert select_thresholds(scores, correct, slack=-0.01) == [pytest.approx(0.8), 0.0]
    # nothing feasible -> never stop there
    assert select_thresholds(scores, correct, slack=-0.5) == [math.inf, 0.0]


def test_select_thresholds_ties_stop_together():
    scores = torch.tensor([[0.9, 0.9, 0.5], [1.0, 1.0, 1.0]])
    correct = torch.tensor([[True, False, True], [True, True, False]])  # final error 1/3
    # a cut between the two tied 0.9 rows is not possible: {0.9, 0.9} has error 1/2 > 1/3; all three: 1/3
    assert select_thresholds(scores, correct) == [pytest.approx(0.5), 0.0]
    assert select_thresholds(scores, correct, slack=-0.1) == [math.inf, 0.0]


def _synthetic(num_exits=4, rows=600, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(num_exits, rows, classes, generator=generator)
    for index in range(num_exits):
        logits[index, torch.arange(rows), labels] += 0.7 * (index + 1)
    return logits, labels


@pytest.mark.parametrize("weights", ["accuracy", "cost"])
def test_calibrated_thresholds_keep_each_exit_error_below_final(weights):
    logits, labels = _synthetic()
    rule = BEEMRule(threshold=0.0, weights=weights)
    BEEMCalibration().fit(rule, ExitStatistics.from_logits(logits, labels, [3, 6, 9, 12]))
    exits = simulate_exits(rule, logits)
    predictions = logits[exits, torch.arange(labels.numel())].argmax(-1)
    wrong = predictions != labels
    final_error = float((logits[-1].argmax(-1) != labels).float().mean())
    assert rule.final_error == pytest.approx(final_error)
    assert int((exits < 3).sum()) > 0  # some samples leave early
    for index in range(3):
        stopped = exits == index
        if stopped.any():
            assert float(wrong[stopped].float().mean()) <= final_error + 1e-9
    if weights == "accuracy":
        expected = [(logits[i].argmax(-1) == labels).float().mean().item() for i in range(4)]
        assert rule.expert_weights == pytest.approx(expected)
    else:
        assert rule.expert_weights == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_slack_is_the_sweep_knob_and_survives_a_json_round_trip():
    logits, labels = _synthetic()
    rule = BEEMRule()
    BEEMCalibration().fit(rule, ExitStatistics.from_logits(logits, labels, [1, 2, 3, 4]))
    mean_exit = [float(simulate_exits(rule.with_threshold(t), logits).float().mean()) for t in (0.0, 0.1, 0.3)]
    assert mean_exit[0] >= mean_exit[1] >= mean_exit[2]  # more slack, earlier exits
    state = json.loads(json.dumps(rule.calibration_state()))
    reloaded = BEEMRule()
    reloaded.load_calibration_state(state)
    for point in rule.default_sweep():
        assert simulate_exits(reloaded.with_threshold(point), logits).tolist() == \
            simulate_exits(rule.with_threshold(point), logits).tolist()
    with pytest.raises(CalibrationError):
        reloaded.with_threshold(0.123)


def test_uncalibrated_rule_fails_clearly():
    with pytest.raises(CalibrationError, match="not calibrated"):
        simulate_exits(BEEMRule(), torch.randn(3, 2, 2))


def test_cost_weight_trades_errors_for_depth():
    logits, labels = _synthetic()
    rule = BEEMRule(cost_weight=0.0)
    BEEMCalibration().fit(rule, ExitStatistics.from_logits(logits, labels, [1, 2, 3, 4]))
    # lambda = 0: only errors count, so no exit stops early
    assert rule.alphas[:-1] == [math.inf] * 3
    eager = BEEMRule(cost_weight=10.0)
    BEEMCalibration().fit(eager, ExitStatistics.from_logits(logits, labels, [1, 2, 3, 4]))
    paper = BEEMRule()
    BEEMCalibration().fit(paper, ExitStatistics.from_logits(logits, labels, [1, 2, 3, 4]))
    # a large lambda takes the most stops the error constraint allows: the paper's rule
    assert eager.alphas == paper.alphas


def test_regression_is_refused():
    with pytest.raises(CalibrationError, match="regression"):
        BEEMCalibration().fit(BEEMRule(), ExitStatistics.from_logits(torch.randn(3, 5, 1), torch.randn(5), [1, 2, 3]))
