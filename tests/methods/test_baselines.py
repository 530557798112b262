"""DeeBERT (entropy + two-stage) and PABEE (patience + depth-weighted joint loss) on the shared paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods_helpers import random_batch, tiny_model
from mmexit.exits.base import ExitView
from mmexit.exits.confidence import EntropyRule
from mmexit.exits.patience import PatienceRule
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss, JointLoss


def _batch():
    ids, mask = random_batch(8)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}


def test_pabee_joint_loss_uses_depth_weights():
    model = tiny_model()
    batch = _batch()
    loss, _ = JointLoss()(model, batch, 0.0)
    with torch.no_grad():
        logits = model.forward_exits(batch["input_ids"], batch["attention_mask"])
    ce = [float(F.cross_entropy(logits[i], batch["labels"])) for i in range(4)]
    assert float(loss.detach()) == pytest.approx(sum((i + 1) * c for i, c in enumerate(ce)) / 10, rel=1e-5)


def test_deebert_two_stage_losses():
    model = tiny_model()
    batch = _batch()
    assert FinalOnlyLoss.trains == "final" and InternalExitsLoss.trains == "internal"
    stage2, _ = InternalExitsLoss()(model, batch, 0.0)
    with torch.no_grad():
        logits = model.forward_exits(batch["input_ids"], batch["attention_mask"])
    ce = [float(F.cross_entropy(logits[i], batch["labels"])) for i in range(3)]
    assert float(stage2.detach()) == pytest.approx(sum(ce) / 3, rel=1e-5)


def test_entropy_hand_case():
    # p = (0.5, 0.5): H = log 2 = 0.693; p = (0.99, 0.01): H = 0.056
    logits = torch.tensor([[0.0, 0.0], [4.59512, 0.0]])
    assert EntropyRule(0.1).decide(ExitView(logits, 0, 3), {}).tolist() == [False, True]


def test_patience_counts_consecutive_agreements():
    rule = PatienceRule(2)
    state = rule.start(2, torch.device("cpu"))
    predictions = [[0, 1], [0, 0], [0, 1], [1, 1]]  # row 0: agree, agree -> exit at index 2
    stops = []
    for index, pred in enumerate(predictions):
        logits = F.one_hot(torch.tensor(pred), 2).float()
        stops.append(rule.decide(ExitView(logits, index, 5), state).tolist())
    assert [s[0] for s in stops] == [False, False, True, False]
    assert [s[1] for s in stops] == [False, False, False, False]
