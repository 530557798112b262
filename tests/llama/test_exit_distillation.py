"""Distilling a captioner's internal exits toward its full model: the teacher-forced states are the
exits' own, agreement rises on the captions trained on, and the full model (and so every exact
self-speculative decode) is unchanged."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from llama_testing import BOS, EOS, PAD, llama_spec
from mmexit.errors import RecipeError
from mmexit.inference.search import greedy_decode
from mmexit.models.captioner import build_captioner
from mmexit.training.exit_distillation import agreement, distill_exits, exit_states

MAX_LEN = 10


def adapter_captioner():
    torch.manual_seed(0)
    return build_captioner({**llama_spec(exit_head="adapter"), "decoder": {**llama_spec()["decoder"], "freeze": True}})


def greedy_states(model, images: int, seed: int):
    with torch.inference_mode():
        features = model.encode(torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
        tokens = greedy_decode(model, features, None, MAX_LEN, BOS, EOS).tokens
    return features, tokens, exit_states(model, features, tokens, BOS, PAD, batch_size=5)


def test_exit_states_are_the_exits_hidden_states_at_the_caption_positions():
    model = adapter_captioner().eval()
    features, tokens, states = greedy_states(model, 6, 0)
    assert states.targets.tolist() == [token for row in tokens for token in row]
    assert states.hidden.shape == (model.num_exits - 1, len(states.targets), 32)
    with torch.inference_mode():  # the same positions through the model's own teacher-forced pass
        inputs = torch.full((6, max(map(len, tokens))), PAD)
        for i, row in enumerate(tokens):
            inputs[i, :len(row)] = torch.tensor([BOS, *row[:-1]])
        logits = model.forward_exits(features, inputs)  # [exits, 6, T, vocab]
        valid = torch.zeros_like(inputs, dtype=torch.bool)
        for i, row in enumerate(tokens):
            valid[i, :len(row)] = True
        for exit_index in range(model.num_exits - 1):
            expected = logits[exit_index][valid]
            assert torch.allclose(model.exit_logits(exit_index, states.hidden[exit_index]), expected, atol=1e-4)
        assert (logits[-1][valid].argmax(-1) == states.targets).all()  # targets are the full model's tokens


def test_distillation_raises_agreement_and_leaves_the_full_model_unchanged():
    model = adapter_captioner().eval()
    _, _, train = greedy_states(model, 24, 0)
    features, full_tokens, _ = greedy_states(model, 4, 1)
    backbone = copy.deepcopy(model.state_dict())
    before = agreement(model, train)
    log = distill_exits(model, train, train, epochs=3, lr=1e-2)  # held out = trained on: it must rise
    after = agreement(model, train)
    assert all(a >= b for a, b in zip(after, before)) and sum(after) > sum(before)
    assert [history[0] for history in log.held_out] == pytest.approx(before)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, backbone[k])}
    internal = {f"exit_modules.{i}." for i in range(model.num_exits - 1)}  # not the last exit's adapter
    assert changed and all(any(k.startswith(prefix) for prefix in internal) for k in changed)
    with torch.inference_mode():
        assert greedy_decode(model, features, None, MAX_LEN, BOS, EOS).tokens == full_tokens


def test_exits_without_parameters_cannot_be_distilled():
    torch.manual_seed(0)
    model = build_captioner(llama_spec()).eval()  # shared heads
    _, _, states = greedy_states(model, 2, 0)
    with pytest.raises(RecipeError, match="exit_head"):
        distill_exits(model, states, states, epochs=1)


def test_the_tool_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import distill_exits as tool

    assert tool.main([str(tmp_path / "no_run"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("distill_exits: error:") and "\n" not in error
    assert not (tmp_path / "out").exists()
