"""COSEE: simulated exits, sample weights, beta schedule, OSC hinge, energy signal (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods_helpers import random_batch, tiny_model
from mmexit.exits.base import ExitView
from mmexit.exits.energy import EnergyRule, normalized_energy
from mmexit.training.cosee import COSEELoss, sample_weights, signal_calibration_loss, simulated_exit


def test_normalized_energy_values_and_no_overflow():
    # E = -logsumexp([0, 0]) = -log 2 -> sigmoid(-log 2) = 1 / (1 + 2) = 1/3
    assert float(normalized_energy(torch.tensor([0.0, 0.0]))) == pytest.approx(1 / 3)
    huge = normalized_energy(torch.tensor([[1e4, 0.0], [-1e4, -1e4], [3e38, 3e38]]))
    assert torch.isfinite(huge).all()
    assert huge.tolist() == pytest.approx([0.0, 1.0, 0.0])
    # half precision logits are computed in float32
    assert float(normalized_energy(torch.tensor([60000.0, 0.0], dtype=torch.float16))) == 0.0


def test_energy_rule_exits_below_threshold():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0]])  # E_norm = 1/3 and ~0.0067
    stop = EnergyRule(0.1).decide(ExitView(logits, 0, 3), {})
    assert stop.tolist() == [False, True]


def test_simulated_exit_first_internal_signal_below_threshold():
    signals = torch.tensor([[0.5, 0.1, 0.9], [0.2, 0.05, 0.8], [0.0, 0.0, 0.0]])  # [M=3, N=3]
    exits = simulated_exit(signals, torch.tensor([0.3, 0.01]))
    assert exits.tolist() == [[1, 0, 2], [2, 2, 2]]  # the last exit's signal is never consulted


def test_sample_weights_softmax_over_distance():
    weights = sample_weights(torch.tensor([[1]]), 3, beta=1.0)[0, 0]
    e = math.exp(-1)
    assert weights.tolist() == pytest.approx([e / (1 + 2 * e), 1 / (1 + 2 * e), e / (1 + 2 * e)])
    uniform = sample_weights(torch.tensor([[0, 2]]), 3, beta=0.0)
    assert uniform.flatten().tolist() == pytest.approx([1 / 3] * 6)
    sharp = sample_weights(torch.tensor([[2]]), 3, beta=50.0)[0, 0]
    assert sharp.tolist() == pytest.approx([0.0, 0.0, 1.0], abs=1e-12)


def test_osc_hinge_hand_case():
    signals = torch.tensor([
        [0.1, 0.2, 0.5, 0.6],  # correct mean 0.15, wrong 0.55: 0.15 - 0.55 + 0.3 < 0 -> 0
        [0.5, 0.4, 0.2, 0.9],  # correct (0.5, 0.4) mean 0.45, wrong (0.2, 0.9) mean 0.55 -> 0.2
        [0.3, 0.3, 0.3, 0.3],  # all correct: skipped
        [0.9, 0.9, 0.9, 0.9],  # the last exit is not an internal exit
    ])
    correct = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    loss, used = signal_calibration_loss(signals, correct, eps=0.3)
    assert used == 2
    assert float(loss) == pytest.approx((0.0 + 0.2) / 2)
    none, used = signal_calibration_loss(signals[2:], correct[2:], 0.3)
    assert used == 0 and float(none) == 0.0


def _batch(size=8):
    ids, mask = random_batch(size)
    labels = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_loss_at_progress_zero_is_mean_exit_ce_plus_alpha_osc_and_beta_grows():
    model = tiny_model()
    batch = _batch()
    loss_fn = COSEELoss(alpha=0.1)
    loss, logs = loss_fn(model, batch, progress=0.0)
    with torch.no_grad():
        logits = model.forward_exits(batch["input_ids"], batch["attention_mask"])
    ce = torch.stack([F.cross_entropy(logits[i], batch["labels"]) for i in range(model.num_exits)]).mean()
    correct = logits.argmax(-1) == batch["labels"]
    osc, _ = signal_calibration_loss(normalized_energy(logits), correct, 0.3)
    assert logs["beta"] == 0.0
    assert float(loss.detach()) == pytest.approx(float(ce + 0.1 * osc), rel=1e-5)
    _, logs = loss_fn(model, batch, progress=0.5)
    assert logs["beta"] == pytest.approx(5.0)  # beta_0 * step / total
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.heads[0].parameters())


def test_loss_matches_hand_weighting_with_fixed_thresholds():
    model = tiny_model()
    batch = _batch()
    loss_fn = COSEELoss(num_thresholds=2, alpha=0.0)
    loss_fn.sample_thresholds = lambda device: torch.tensor([0.2, 0.6])
    loss, _ = loss_fn(model, batch, progress=1.0)
    with torch.no_grad():
        logits = model.forward_exits(batch["input_ids"], batch["attention_mask"])
    signals = normalized_energy(logits)
    ce = torch.stack([F.cross_entropy(logits[i], batch["labels"], reduction="none") for i in range(4)])  # [M, N]
    total = 0.0
    for tau in (0.2, 0.6):
        for n in range(8):
            below = [m for m in range(3) if float(signals[m, n]) < tau]
            star = below[0] if below else 3
            w = torch.softmax(torch.tensor([-10.0 * abs(m - star) for m in range(4)]), 0)
            total += float((w * ce[:, n]).sum()) / 8
    assert float(loss) == pytest.approx(total / 2, rel=1e-5)


def test_threshold_range_comes_from_the_previous_epoch():
    model = tiny_model()
    loss_fn = COSEELoss()
    loss_fn.start_epoch(0)
    assert loss_fn.signal_range == (0.0, 1.0)
    batch = _batch()
    loss_fn(model, batch, 0.1)
    with torch.no_grad():
        internal = normalized_energy(model.forward_exits(batch["input_ids"], batch["attention_mask"]))[:-1]
    loss_fn.start_epoch(1)
    assert loss_fn.signal_range == pytest.approx((float(internal.min()), float(internal.max())))
    thresholds = loss_fn.sample_thresholds(torch.device("cpu"))
    assert thresholds.shape == (5,)
    assert bool(((thresholds >= internal.min()) & (thresholds <= internal.max())).all())
