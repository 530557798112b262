"""Multi-Model cascade: batched == one-by-one == simulated, cumulative cost accounting."""

from __future__ import annotations

import pytest
import torch

from methods_helpers import random_batch, tiny_model
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.exits.patience import PatienceRule
from mmexit.inference.cascade import cascade_forward, simulate_cascade
from mmexit.models.cascade import MultiModelCascade, cascade_all_logits, cumulative_layers


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


def test_evaluate_cascade_writes_results(models, tmp_path):
    """The cascade's command end to end on tiny members and a tiny GLUE folder: a full-model row per
    timed batch size, a simulated sweep, and a measured point whose answers equal the simulation's."""
    import json

    from mmexit.tasks.cascade_evaluation import cascade_main as main
    from mmexit_testing import make_glue, tiny_recipe

    folders = []
    for index, model in enumerate(models):
        model.save_pretrained(tmp_path / f"m{index}")
        folders.append(str(tmp_path / f"m{index}"))
    recipe = tiny_recipe(tmp_path, make_glue(tmp_path))
    assert main([*folders, "--recipe", str(recipe), "--output", str(tmp_path / "mm")]) == 0
    rows = json.loads((tmp_path / "mm" / "results.json").read_text())["rows"]
    full = [r for r in rows if r["method"] == "full"]
    assert [r["batch_size"] for r in full] == [8] and full[0]["exit_histogram"] == {"4": 16}
    sweep = [r for r in rows if r["method"] == "multi_model+maxprob" and r["simulated"]]
    measured = [r for r in rows if r["method"] == "multi_model+maxprob" and not r["simulated"]]
    assert len(sweep) == len(MaxProbRule().default_sweep()) and len(measured) == 1
    twin = next(r for r in sweep if r["operating_point"] == measured[0]["operating_point"])
    assert measured[0]["metrics"] == twin["metrics"] and measured[0]["exit_histogram"] == twin["exit_histogram"]
    assert measured[0]["wall_speedup"] > 0
