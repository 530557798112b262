"""SWEET: each exit's loss reaches only its own segment (exactly zero gradient elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods_helpers import random_batch, tiny_model
from mmexit.training.sweet import SweetLoss


def _segments(model):
    """For each exit: the set of 0-based layers it owns (exit 0 also owns the embeddings)."""
    owned, previous = [], 0
    for layer in model.exit_layers:
        owned.append(set(range(previous, layer)))
        previous = layer
    return owned


def _grad_norms(model):
    """Gradient norm per group: 'embeddings', ('layer', i), ('head', j)."""
    def norm(module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return sum(float(g.abs().sum()) for g in grads)

    groups = {"embeddings": norm(model.backbone.embeddings)}
    for index, layer in enumerate(model.adapter.layers):
        groups[("layer", index)] = norm(layer)
    for index, head in enumerate(model.heads):
        groups[("head", index)] = norm(head)
    return groups


@pytest.mark.parametrize("exits", ["all", [2, 4]])
def test_each_exit_loss_only_reaches_its_segment(exits):
    model = tiny_model(exits=exits).train()
    ids, mask = random_batch(8)
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0))
    for exit_index, owned in enumerate(_segments(model)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        logits = model.forward_exits(ids, mask, detach_between_exits=True)
        F.cross_entropy(logits[exit_index], labels).backward()
        norms = _grad_norms(model)
        assert (norms["embeddings"] > 0) == (exit_index == 0)
        for layer in range(model.num_layers):
            assert (norms[("layer", layer)] > 0) == (layer in owned), (exit_index, layer)
            if layer not in owned:
                assert norms[("layer", layer)] == 0.0
        for head in range(model.num_exits):
            assert (norms[("head", head)] > 0) == (head == exit_index)


def test_without_detach_a_late_exit_reaches_the_first_layer():
    model = tiny_model()
    ids, mask = random_batch(8)
    logits = model.forward_exits(ids, mask)
    F.cross_entropy(logits[-1], torch.zeros(8, dtype=torch.long)).backward()
    assert _grad_norms(model)[("layer", 0)] > 0


def test_sweet_loss_is_the_unweighted_sum_of_the_exits_losses():
    model = tiny_model()
    ids, mask = random_batch(8)
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(0))
    loss, logs = SweetLoss()(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, 0.5)
    with torch.no_grad():
        logits = model.forward_exits(ids, mask)
    expected = sum(F.cross_entropy(logits[i], labels) for i in range(model.num_exits))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()  # the summed loss trains every segment
    norms = _grad_norms(model)
    assert all(norms[("layer", i)] > 0 for i in range(model.num_layers))


def test_sweet_loss_regression():
    model = tiny_model(num_labels=1)
    ids, mask = random_batch(4)
    labels = torch.tensor([0.5, 1.0, 2.0, 4.0])
    loss, _ = SweetLoss()(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, 0.0)
    with torch.no_grad():
        logits = model.forward_exits(ids, mask)
    expected = sum(float(((logits[i, :, 0] - labels) ** 2).mean()) for i in range(model.num_exits))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
