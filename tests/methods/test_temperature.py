"""Per-exit temperature scaling by NLL on the calibration split."""

from __future__ import annotations

import pytest
import torch

from mmexit.calibration.statistics import ExitStatistics
from mmexit.calibration.temperature import TemperatureCalibration, exit_statistics, fit_temperatures
from mmexit.exits.confidence import MaxProbRule


def test_recovers_known_temperatures():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3000, 4, generator=generator) * 3
    labels = torch.multinomial((base / 1.0).softmax(-1), 1, generator=generator).squeeze(-1)
    # exit 0 is over-confident by 2x, exit 1 under-confident by 2x, exit 2 calibrated
    logits = torch.stack([base * 2.0, base * 0.5, base])
    temperatures = fit_temperatures(logits, labels)
    assert temperatures == pytest.approx([2.0, 0.5, 1.0], rel=0.15)


def test_regression_gets_one_and_component_sets_rule():
    assert fit_temperatures(torch.randn(2, 10, 1), torch.randn(10)) == [1.0, 1.0]
    rule = MaxProbRule()
    logits = torch.randn(2, 50, 3)
    TemperatureCalibration().fit(rule, ExitStatistics.from_logits(logits, torch.randint(0, 3, (50,)), [1, 2]))
    assert len(rule.temperatures) == 2


def test_exit_statistics_chunked_matches_direct(monkeypatch):
    import mmexit.calibration.temperature as temperature

    monkeypatch.setattr(temperature, "CHUNK_ROWS", 7)
    logits = torch.randn(2, 30, 5)
    labels = torch.randint(0, 5, (30,))
    confidence, prediction, correct = exit_statistics(logits, labels, [2.0, 1.0])
    torch.testing.assert_close(confidence[0], (logits[0] / 2).softmax(-1).amax(-1))
    assert prediction.tolist() == logits.argmax(-1).tolist()
    assert correct.tolist() == (logits.argmax(-1) == labels).tolist()
