"""Hand-computed cases for the first rules and losses, and the two-stage freezing."""

from __future__ import annotations

import math

import torch

from mmexit_testing import random_batch, tiny_model
from mmexit.exits.base import ExitView
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.confidence import EntropyRule, MaxProbRule
from mmexit.exits.patience import PatienceRule
from mmexit.training.base import depth_weights
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss, JointLoss
from mmexit.training.trainer import set_trainable


def test_maxprob_and_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # p = (0.881, 0.119) and (0.5, 0.5)
    view = ExitView(logits, 0, 3)
    assert MaxProbRule(0.88).decide(view, {}).tolist() == [True, False]
    entropy_first = -(0.8808 * math.log(0.8808) + 0.1192 * math.log(0.1192))  # 0.3635
    assert EntropyRule(0.37).decide(view, {}).tolist() == [True, False]
    assert EntropyRule(entropy_first - 0.01).decide(view, {}).tolist() == [False, False]
    rule = MaxProbRule(0.88)
    rule.temperatures = [2.0, 1.0, 1.0]  # softmax(1, 0) = 0.731 < 0.88
    assert rule.decide(view, {}).tolist() == [False, False]


def test_patience_counts_consecutive_agreements():
    # predictions per exit for 3 rows: row 0: 1,1,1,1  row 1: 0,1,0,1  row 2: 0,0,1,1
    predictions = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]])
    logits = torch.nn.functional.one_hot(predictions, 2).float() * 3  # [4 exits, 3 rows, 2]
    assert simulate_exits(PatienceRule(1), logits).tolist() == [1, 3, 1]
    assert simulate_exits(PatienceRule(2), logits).tolist() == [2, 3, 3]


def test_patience_regression_tolerance():
    logits = torch.tensor([[[1.0]], [[1.05]], [[1.5]], [[1.52]]])
    assert simulate_exits(PatienceRule(1, regression_tol=0.1), logits).tolist() == [1]


def test_depth_weights_are_pabee_weights():
    assert torch.allclose(depth_weights(4, torch.device("cpu")), torch.tensor([1, 2, 3, 4]) / 10)


def _batch(num_labels=3):
    ids, mask = random_batch(8)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(8) % num_labels}


def test_joint_loss_is_weighted_sum_of_exit_ce():
    model = tiny_model("bert")
    model.train(False)
    batch = _batch()
    loss, logs = JointLoss()(model, batch, 0.0)
    logits = model.forward_exits(batch["input_ids"], batch["attention_mask"])
    per_exit = torch.stack([torch.nn.functional.cross_entropy(l, batch["labels"]) for l in logits])
    expected = (depth_weights(4, torch.device("cpu")) * per_exit).sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    with_kl, logs = JointLoss(distill_weight=1.0)(model, batch, 0.0)
    assert with_kl > loss and logs["loss_distill"] > 0


def test_two_stage_trains_the_right_parameters():
    model = tiny_model("bert")
    model.train(False)
    batch = _batch()
    set_trainable(model, "final")
    FinalOnlyLoss()(model, batch, 0.0)[0].backward()
    assert model.heads[0].classifier.weight.grad is None
    assert model.heads[-1].classifier.weight.grad is not None
    assert model.backbone.encoder.layer[0].attention.self.query.weight.grad is not None
    model.zero_grad(set_to_none=True)
    set_trainable(model, "internal")
    InternalExitsLoss()(model, batch, 0.0)[0].backward()
    assert model.heads[0].classifier.weight.grad is not None
    assert model.heads[-1].classifier.weight.grad is None
    assert all(p.grad is None for p in model.backbone.parameters())
