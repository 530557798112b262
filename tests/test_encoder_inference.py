"""Equivalence of the batched early-exit path: never-exit == full model, batched == one-by-one,
real == simulated, for every family the adapters support."""

from __future__ import annotations

import pytest
import torch

from mmexit_testing import random_batch, tiny_model
from mmexit.inference.exit_loop import simulate_exits
from mmexit.exits.confidence import EntropyRule, FixedExitRule, MaxProbRule, NeverExitRule
from mmexit.exits.patience import PatienceRule
from mmexit.inference.encoder import early_exit_forward

FAMILIES = ["bert", "mpnet", "roberta"]
RULE_NAMES = ["maxprob", "entropy", "patience1", "patience2", "fixed1"]


def make_rule(name: str, all_logits: torch.Tensor):
    """The rule, with confidence thresholds at the median of the internal exits' signal, so that
    rows of a random model really exit at different layers."""
    probs = all_logits[:-1].softmax(-1)
    if name == "maxprob":
        return MaxProbRule(float(probs.amax(-1).median()))
    if name == "entropy":
        return EntropyRule(float(-(probs * probs.log()).sum(-1).median()))
    if name.startswith("patience"):
        return PatienceRule(int(name[-1]))
    return FixedExitRule(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_full_model(family):
    model = tiny_model(family)
    ids, mask = random_batch()
    with torch.inference_mode():
        full = model.forward_full(ids, mask)
        out = early_exit_forward(model, NeverExitRule(), ids, mask)
    assert torch.equal(out.logits, full)
    assert out.exit_index.tolist() == [model.num_exits - 1] * 32
    assert out.layers_used.tolist() == [model.num_layers] * 32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_batched_equals_one_by_one_and_simulated(family, rule_name):
    model = tiny_model(family)
    ids, mask = random_batch(32)
    with torch.inference_mode():
        rule = make_rule(rule_name, model.forward_exits(ids, mask))
        batched = early_exit_forward(model, rule, ids, mask)
        lengths = mask.sum(1).tolist()  # one-by-one also without padding
        singles = [early_exit_forward(model, rule, ids[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(lengths)]
        all_logits = model.forward_exits(ids, mask)
    single_exits = torch.cat([s.exit_index for s in singles])
    single_preds = torch.cat([s.logits.argmax(-1) for s in singles])
    assert torch.equal(batched.exit_index, single_exits)
    assert torch.equal(batched.logits.argmax(-1), single_preds)
    assert torch.allclose(batched.logits, torch.cat([s.logits for s in singles]), atol=1e-5)
    assert torch.equal(batched.exit_index, simulate_exits(rule, all_logits))
    # the rows really exit at different layers (otherwise this test would prove little)
    if not isinstance(rule, FixedExitRule):
        assert len(set(batched.exit_index.tolist())) > 1


def test_exits_subset_and_last_layer_added():
    model = tiny_model("bert", exits=[1, 3])
    assert model.exit_layers == [1, 3, 4]
    ids, mask = random_batch(8)
    with torch.inference_mode():
        out = early_exit_forward(model, MaxProbRule(0.0), ids, mask)
    assert out.layers_used.tolist() == [1] * 8


def test_rows_leave_the_batch(monkeypatch):
    """Layers after an exit see only the rows still running."""
    model = tiny_model("bert")
    seen = []
    original = model.run_layer

    def spy(index, hidden, context):
        seen.append(hidden.shape[0])
        return original(index, hidden, context)

    monkeypatch.setattr(model, "run_layer", spy)
    ids, mask = random_batch(32)
    with torch.inference_mode():
        out = early_exit_forward(model, FixedExitRule(1), ids, mask)
    assert seen == [32, 32]  # layers 1-2 ran; every row stopped at the second exit
    assert out.layers_used.tolist() == [2] * 32


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model("mpnet", num_labels=2, exits=[2, 4])
    model.save_pretrained(tmp_path / "model")
    from mmexit.models.encoder import MultiExitEncoder

    loaded = MultiExitEncoder.from_pretrained(tmp_path).eval()
    ids, mask = random_batch(4)
    with torch.inference_mode():
        assert torch.equal(loaded.forward_exits(ids, mask), model.forward_exits(ids, mask))
    assert loaded.exit_layers == [2, 4]
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_truncated_backbone_is_a_smaller_model():
    from mmexit.models.encoder import MultiExitEncoder
    from mmexit.models.loading import tiny_backbone, truncate_backbone

    backbone = tiny_backbone("tiny:bert")
    truncate_backbone(backbone, 2)
    model = MultiExitEncoder(backbone, 2, "all")
    assert model.num_layers == 2 and model.exit_layers == [1, 2]
