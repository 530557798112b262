"""PCEE: bins, lookups, sparse bins, unreachable delta, isotonic smoothing (hand-computed cases)."""

from __future__ import annotations

import json

import torch

from mmexit.calibration.pcee import PCEECalibration
from mmexit.calibration.statistics import ExitStatistics
from mmexit.exits.base import ExitView
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.pcee import PCEERule, bin_edges, bin_index


def _binary_logits(confidence: torch.Tensor, predicted_class: torch.Tensor) -> torch.Tensor:
    """Two-class logits [N, 2] with softmax max = confidence at predicted_class."""
    logit = torch.log(confidence / (1 - confidence))
    zeros = torch.zeros_like(logit)
    return torch.where(predicted_class.unsqueeze(-1) == 1, torch.stack([zeros, logit], -1), torch.stack([logit, zeros], -1))


def test_equal_width_edges_and_lookup():
    edges = bin_edges(torch.empty(0), 5, "equal_width", 2)  # [0.5, 1] in 5 bins
    torch.testing.assert_close(edges, torch.tensor([0.6, 0.7, 0.8, 0.9]))
    assert bin_index(torch.tensor([0.55, 0.65, 0.7, 0.95, 1.0]), edges).tolist() == [0, 1, 2, 4, 4]


def test_equal_mass_edges_are_quantiles():
    confidence = torch.arange(1, 101).float() / 100  # 0.01 .. 1.00
    edges = bin_edges(confidence, 4, "equal_mass", 2)
    counts = torch.bincount(bin_index(confidence, edges), minlength=4)
    assert counts.tolist() == [25, 25, 25, 25]


def _calibrated(min_bin_count=3, smoothing="none"):
    """Exit 0: bins [0.5,0.6) .. [0.9,1] with hand-chosen accuracies; exit 1 = final."""
    conf = torch.tensor([0.55] * 4 + [0.65] * 4 + [0.75] * 4 + [0.85] * 4 + [0.95] * 2)
    correct0 = torch.tensor([1, 0, 0, 0] + [1, 1, 0, 0] + [1, 1, 1, 0] + [1, 1, 1, 1] + [1, 1]).bool()
    rule = PCEERule(threshold=0.7, num_bins=5, binning="equal_width", min_bin_count=min_bin_count, smoothing=smoothing)
    rule.set_statistics(torch.stack([conf, torch.full_like(conf, 0.9)]),
                        torch.stack([correct0, torch.ones_like(correct0)]), num_classes=2)
    return rule


def test_bin_accuracies_and_decision():
    rule = _calibrated()
    torch.testing.assert_close(rule.accuracy[0], torch.tensor([0.25, 0.5, 0.75, 1.0, 1.0]))
    assert rule.counts[0].tolist() == [4, 4, 4, 4, 2]
    logits = _binary_logits(torch.tensor([0.52, 0.66, 0.78, 0.88, 0.97]), torch.tensor([0, 1, 0, 1, 1]))
    stop = rule.decide(ExitView(logits, 0, 2), {})
    # delta 0.7: bins 2 and 3 reach it; bin 4 (2 samples < min count 3) is sparse and never exits
    assert stop.tolist() == [False, False, True, True, False]
    assert rule.with_threshold(0.8).decide(ExitView(logits, 0, 2), {}).tolist() == [False, False, False, True, False]


def test_the_kept_decision_table_follows_the_operating_point_and_the_guarantee():
    """decide keeps each exit's (edges, allowed) table; copies at other deltas share the cache but not
    the table, a guarantee set later replaces it, and every decision equals the bin lookup."""
    rule = _calibrated()
    confidence = torch.tensor([0.52, 0.66, 0.78, 0.88, 0.97])
    logits = _binary_logits(confidence, torch.tensor([0, 1, 0, 1, 1]))

    def looked_up(r):
        return r.exit_allowed(0)[bin_index(confidence, r.edges[0])].tolist()

    first = rule.decide(ExitView(logits, 0, 2), {}).tolist()
    assert first == looked_up(rule) == [False, False, True, True, False]
    for delta in (0.3, 0.6, 0.8, 0.95):
        other = rule.with_threshold(delta)
        assert other.decide(ExitView(logits, 0, 2), {}).tolist() == looked_up(other)
    assert rule.decide(ExitView(logits, 0, 2), {}).tolist() == first  # the copies did not change the original's
    rule.set_guarantee("bins", alpha=0.1)  # 4 samples per bin: no lower bound reaches 0.7
    assert rule.decide(ExitView(logits, 0, 2), {}).tolist() == [False] * 5


def test_sparse_bins_never_exit_even_at_accuracy_one():
    rule = _calibrated(min_bin_count=5)  # every bin has < 5 samples
    logits = _binary_logits(torch.tensor([0.97, 0.88]), torch.tensor([1, 1]))
    assert rule.decide(ExitView(logits, 0, 2), {}).tolist() == [False, False]
    assert not rule.reachable(0.5)
    assert "falls back to the full model" in rule.warning


def test_unreachable_delta_falls_back_to_the_full_model_with_a_warning():
    rule = _calibrated().with_threshold(0.9)
    rule.counts = [rule.counts[0].clone(), rule.counts[1]]
    rule.accuracy = [torch.tensor([0.25, 0.5, 0.75, 0.875, 1.0]), rule.accuracy[1]]  # bin 4 is sparse
    logits = torch.stack([_binary_logits(torch.tensor([0.88, 0.99]), torch.tensor([1, 0]))] * 2)
    assert simulate_exits(rule, logits).tolist() == [1, 1]
    assert "no internal exit reaches delta=0.9" in rule.warning
    assert "above the final exit's calibration accuracy" not in rule.warning  # final accuracy is 1.0
    assert _calibrated().warning is None


def test_isotonic_smoothing_is_monotone_and_keeps_sparse_bins_closed():
    conf = torch.tensor([0.55] * 4 + [0.65] * 4 + [0.75] * 4 + [0.85] * 4)
    correct = torch.tensor([1, 1, 1, 0] + [1, 0, 0, 0] + [1, 1, 1, 1] + [1, 1, 1, 0]).bool()
    rule = PCEERule(threshold=0.8, num_bins=5, binning="equal_width", min_bin_count=3, smoothing="isotonic")
    rule.set_statistics(torch.stack([conf, conf]), torch.stack([correct, correct]), 2)
    smoothed = rule.accuracy[0][:4]
    # raw 0.75, 0.25, 1.0, 0.75 -> pooled (0.5, 0.5, 0.875, 0.875)
    torch.testing.assert_close(smoothed, torch.tensor([0.5, 0.5, 0.875, 0.875]))
    assert rule.counts[0][4] == 0 and not bool(rule.exit_allowed(0)[4])


def test_calibration_state_round_trip():
    rule = _calibrated()
    reloaded = PCEERule()
    reloaded.load_calibration_state(json.loads(json.dumps(rule.calibration_state())))
    logits = _binary_logits(torch.tensor([0.52, 0.66, 0.78, 0.88, 0.97]), torch.tensor([0, 1, 0, 1, 1]))
    for delta in rule.default_sweep():
        a = rule.with_threshold(delta).decide(ExitView(logits, 0, 2), {})
        b = reloaded.with_threshold(delta).decide(ExitView(logits, 0, 2), {})
        assert a.tolist() == b.tolist()


def test_fit_from_logits_with_temperatures():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    logits = torch.randn(3, 400, 4, generator=generator)
    logits[:, torch.arange(400), labels] += 1.5
    rule = PCEERule(threshold=0.8)
    rule.temperatures = [2.0, 1.0, 1.0]
    PCEECalibration().fit(rule, ExitStatistics.from_logits(logits, labels, [1, 2, 3]))
    assert sum(int(c.sum()) for c in rule.counts[:1]) == 400
    # the temperature is applied when binning: exit 0 confidences are those of logits / 2
    scaled = (logits[0] / 2).softmax(-1).amax(-1)
    assert float(rule.edges[0].max()) <= float(scaled.max())


def test_state_saved_before_guarantees_existed_loads_as_the_paper_rule():
    rule = _calibrated()
    state = json.loads(json.dumps(rule.calibration_state()))
    for key in ("guarantee", "hits", "final_counts"):
        state.pop(key)
    reloaded = PCEERule()
    reloaded.load_calibration_state(state)
    assert reloaded.guarantee == "none" and reloaded.describe() == "pcee@delta=0.9"
    logits = _binary_logits(torch.tensor([0.52, 0.66, 0.78, 0.88, 0.97]), torch.tensor([0, 1, 0, 1, 1]))
    for delta in rule.default_sweep():
        assert (rule.with_threshold(delta).decide(ExitView(logits, 0, 2), {}).tolist()
                == reloaded.with_threshold(delta).decide(ExitView(logits, 0, 2), {}).tolist())


def test_bin_lower_bounds_close_bins_whose_point_estimate_passes():
    """guarantee 'bins': 3 of 4 right (0.75) passes delta 0.7 as a point estimate, not as a 90% lower bound."""
    rule = _calibrated()
    rule.set_guarantee("bins", alpha=0.1)
    assert rule.describe() == "pcee-cp(alpha=0.1)@delta=0.7"
    assert rule.exit_allowed(0).tolist() == [False] * 5  # 4 samples per bin: no bound reaches 0.7
    # more evidence: 45 of 50 right -> Clopper-Pearson 90% lower bound ~0.83
    conf = torch.tensor([0.95] * 50 + [0.55] * 50)
    correct = torch.tensor([1] * 45 + [0] * 5 + [1] * 25 + [0] * 25).bool()
    rule = PCEERule(threshold=0.8, num_bins=5, binning="equal_width", min_bin_count=3)
    rule.set_statistics(torch.stack([conf, conf]), torch.stack([correct, torch.ones_like(correct)]), 2)
    rule.set_guarantee("bins", alpha=0.1)
    assert rule.exit_allowed(0).tolist() == [False, False, False, False, True]
    assert rule.with_threshold(0.86).exit_allowed(0).tolist() == [False] * 5
