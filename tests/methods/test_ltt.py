"""Learn-then-Test: p-values, fixed-sequence testing, fallback (hand-checkable cases)."""

from __future__ import annotations

import math

import pytest
import torch

from mmexit.calibration.statistics import ExitStatistics
from mmexit.calibration.ltt import LTTCalibration, binomial_p_value, hoeffding_bentkus_p_value, learn_then_test
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.confidence import EntropyRule, MaxProbRule


def test_binomial_p_value():
    # n = 100, 0 disagreements, epsilon 0.05: P(Bin(100, .05) <= 0) = 0.95^100
    assert binomial_p_value(torch.zeros(100), 0.05) == pytest.approx(0.95 ** 100)
    assert binomial_p_value(torch.ones(100), 0.05) == pytest.approx(1.0)
    assert hoeffding_bentkus_p_value(torch.zeros(100), 0.05) >= binomial_p_value(torch.zeros(100), 0.05) - 1e-12


def _logits(rows=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    final = torch.randn(rows, 2, generator=generator) * 3
    noise = torch.randn(3, rows, 2, generator=generator)
    return torch.stack([final + 2.0 * noise[0], final + 1.0 * noise[1], final + 0.5 * noise[2], final])


def test_certified_point_has_low_risk_and_order_is_conservative_first():
    logits = _logits()
    rule = MaxProbRule()
    LTTCalibration(epsilon=0.05, delta=0.1).fit(rule, ExitStatistics.from_logits(logits, torch.zeros(2000, dtype=torch.long), [1, 2, 3, 4]))
    assert rule.ltt_threshold is not None and rule.threshold == rule.ltt_threshold
    thresholds = [step["threshold"] for step in rule.ltt_trace]
    assert thresholds == sorted(thresholds, reverse=True)
    exits = simulate_exits(rule, logits)
    chosen = logits[exits, torch.arange(2000)].argmax(-1)
    assert float((chosen != logits[-1].argmax(-1)).float().mean()) <= 0.05
    # every point before the certified one was certified too (fixed sequence)
    assert all(step["p_value"] <= 0.1 for step in rule.ltt_trace[:-1])


def test_nothing_certified_falls_back_to_full_model():
    logits = _logits(rows=30)
    rule = EntropyRule()
    LTTCalibration(epsilon=0.001, delta=0.01).fit(rule, ExitStatistics.from_logits(logits, torch.zeros(30, dtype=torch.long), [1, 2, 3, 4]))
    assert rule.ltt_threshold is None and "falls back to the full model" in rule.warning
    assert rule.threshold == -math.inf
    assert simulate_exits(rule, logits).tolist() == [3] * 30


def test_learn_then_test_stops_at_first_failure():
    logits = _logits()
    certified, trace = learn_then_test(MaxProbRule(), logits, [0.999, 0.99, 0.9, 0.5], epsilon=0.02, delta=0.05)
    assert certified in (None, 0.999, 0.99, 0.9, 0.5)
    assert all(step["p_value"] <= 0.05 for step in trace[:-1])
