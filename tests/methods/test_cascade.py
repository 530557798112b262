"""Multi-Model cascade: batched == one-by-one == simulated, cumulative cost accounting."""

from __future__ import annotations

import pytest
import torch

from methods_helpers import random_batch, tiny_model
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.exits.patience import PatienceRule
from mmexit.models.cascade import (
    MultiModelCascade, cascade_all_logits, cascade_forward, cumulative_layers, simulate_cascade,
)


@pytest.fixture(scope="module")
def models():
    # independent truncated models of depth 1, 2 and 4, each with one exit at its last layer
    return [tiny_model(exits=[depth], depth=depth, seed=10 + depth) for depth in (1, 2, 4)]


def test_cumulative_layers(models):
    assert [m.num_exits for m in models] == [1, 1, 1]
    assert cumulative_layers(models) == [1, 3, 7]


@pytest.mark.parametrize("rule_name", ["maxprob", "patience"])
def test_batched_equals_one_by_one_and_simulated(models, rule_name):
    ids, mask = random_batch(32)
    all_logits = cascade_all_logits(models, ids, mask)  # [3, 32, 3]
    if rule_name == "maxprob":
        rule = MaxProbRule(float(all_logits[0].softmax(-1).amax(-1).median()))
    else:
        rule = PatienceRule(1)
    out = cascade_forward(models, rule, ids, mask)
    exits, charged = simulate_cascade(rule, all_logits, cumulative_layers(models))
    assert out.exit_index.tolist() == exits.tolist()
    assert out.layers_used.tolist() == charged.tolist()
    assert out.layers_used.tolist() == [[1, 3, 7][int(e)] for e in out.exit_index]
    if rule_name == "maxprob":
        assert len(set(out.exit_index.tolist())) > 1
    for row in range(32):
        single = cascade_forward(models, rule, ids[row:row + 1], mask[row:row + 1])
        assert int(single.exit_index[0]) == int(out.exit_index[row])
        torch.testing.assert_close(single.logits[0], out.logits[row], atol=1e-5, rtol=1e-4)
    # each row's logits are those of the model it stopped at
    torch.testing.assert_close(out.logits, all_logits[out.exit_index, torch.arange(32)], atol=1e-5, rtol=1e-4)


def test_never_exit_runs_every_model_and_returns_the_deepest(models):
    ids, mask = random_batch(16)
    out = cascade_forward(models, NeverExitRule(), ids, mask)
    assert out.layers_used.tolist() == [7] * 16  # cumulative: more than the deepest model's 4 layers
    with torch.no_grad():
        torch.testing.assert_close(out.logits, models[-1].forward_full(ids, mask), atol=1e-5, rtol=1e-4)
    always = cascade_forward(models, MaxProbRule(0.0), ids, mask)
    assert always.layers_used.tolist() == [1] * 16


def test_cascade_class_sorts_by_depth(models, tmp_path):
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{index}")
    cascade = MultiModelCascade.from_folders([tmp_path / "m2", tmp_path / "m0", tmp_path / "m1"])
    assert cascade.cumulative_layers == [1, 3, 7] and cascade.depth == 4
    ids, mask = random_batch(8)
    torch.testing.assert_close(cascade.all_logits(ids, mask), cascade_all_logits(models, ids, mask))
