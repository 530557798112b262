"""The saturation rule, and BEEM / PCEE calibrated per token on teacher-forced statistics."""

from __future__ import annotations

import torch

from mmexit.tasks.captioning import token_statistics
from uncached_stepper import UncachedStepper
from mmexit.inference.search import greedy_decode
from mmexit.calibration.beem import BEEMCalibration
from mmexit.calibration.pcee import PCEECalibration
from mmexit.exits.base import ExitView
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.beem import BEEMRule
from mmexit.exits.pcee import PCEERule
from mmexit.exits.saturation import SaturationRule


class _Tok:
    bos_id, eos_id, pad_id = 1, 2, 0


def test_saturation_rule():
    rule = SaturationRule(0.95)
    state = rule.start(3, torch.device("cpu"))
    h0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    first = rule.decide(ExitView(torch.zeros(3, 5), 0, 3, h0), state)
    assert not first.any()  # nothing to compare with at the first exit
    h1 = torch.tensor([[1.0, 0.01], [0.0, 1.0], [0.0, 1.0]])
    assert rule.decide(ExitView(torch.zeros(3, 5), 1, 3, h1), state).tolist() == [True, False, True]
    hidden = torch.randn(3, 4, 8)
    assert simulate_exits(rule, torch.zeros(3, 4, 5), hidden).shape == (4,)


def test_beem_and_pcee_calibrate_per_token_and_decode(tiny_captioner):
    torch.manual_seed(5)
    images = torch.randn(8, 3, 32, 32)
    captions = [[torch.randint(3, 30, (6,)).tolist() for _ in range(2)] for _ in range(8)]
    stats = token_statistics(tiny_captioner, images, captions, _Tok(), "full_model", batch_size=8, max_length=10)
    assert stats.confidence.shape == (tiny_captioner.num_exits, 8 * 2 * 7)
    assert bool(stats.correct[-1].all())  # the full model agrees with itself
    reference = token_statistics(tiny_captioner, images, captions, _Tok(), "reference", batch_size=8, max_length=10)
    assert not bool(reference.correct[-1].all())
    with torch.inference_mode():
        features = tiny_captioner.encode(images[:4])
    beem = BEEMRule(0.3)
    BEEMCalibration().fit(beem, stats)
    pcee = PCEERule(0.5, min_bin_count=2)
    PCEECalibration().fit(pcee, stats)
    for rule in (beem, pcee):
        cached = greedy_decode(tiny_captioner, features, rule, 8)
        uncached = greedy_decode(tiny_captioner, features, rule, 8, stepper_class=UncachedStepper)
        assert cached.tokens == uncached.tokens
        assert len(cached.layers) > 0
