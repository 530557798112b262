"""Per-token early exit with a LLaMA decoder (image prefix, RoPE, grouped-query attention):
never-exit == full greedy == HF generate(inputs_embeds), beam == HF beam, cached == uncached under
every K/V policy, batched == one-by-one, deferred == oracle (tokens and K/V), exit heads, save/load."""

from __future__ import annotations

import pytest
import torch

from llama_testing import BOS, EOS, PAD
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.exits.saturation import SaturationRule
from mmexit.inference.search import beam_decode, greedy_decode
from mmexit.inference.stepper import CachedStepper
from mmexit.models.captioner import build_captioner, load_captioner, save_captioner
from uncached_stepper import UncachedStepper

MAX_LEN = 10


def _hf_generate(model, features, **kwargs) -> list[list[int]]:
    """transformers' own generate on [image prefix, BOS] given as inputs_embeds; cut after EOS."""
    bos = model.decoder.model.embed_tokens(torch.full((features.shape[0], 1), BOS))
    embeds = torch.cat([features, bos], dim=1)
    out = model.decoder.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=MAX_LEN, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out.tolist()]


def test_never_exit_equals_full_greedy_and_hf_generate(llama_captioner, llama_features):
    model = llama_captioner
    assert model.adapter.num_kv_heads < model.adapter.num_heads  # grouped-query attention
    full = greedy_decode(model, llama_features, None, MAX_LEN, BOS, EOS)
    never = greedy_decode(model, llama_features, NeverExitRule(), MAX_LEN, BOS, EOS)
    lengths = {len(row) for row in full.tokens}
    assert len(lengths) >= 3 and any(EOS in row for row in full.tokens), "test needs rows that finish at different steps"
    assert never.tokens == full.tokens
    with torch.inference_mode():
        assert full.tokens == _hf_generate(model, llama_features)
    assert int(never.layers.min()) == model.num_layers


def test_teacher_forced_exits_equal_hf_forward_and_cached_steps(llama_captioner, llama_features):
    """forward_exits (prefix + caption through LlamaDecoderLayer) == HF forward on inputs_embeds;
    the cached one-position steps give the same last-exit logits."""
    model, features = llama_captioner, llama_features[:3]
    ids = torch.tensor([[BOS, 7, 9, 11], [BOS, 3, 4, 30], [BOS, 12, 12, 8]])
    with torch.inference_mode():
        exits = model.forward_exits(features, ids)  # [M, 3, 4, V]
        embeds = torch.cat([features, model.decoder.model.embed_tokens(ids)], dim=1)
        reference = model.decoder(inputs_embeds=embeds).logits[:, features.shape[1]:]
        assert exits.shape == (model.num_exits, 3, 4, model.vocab_size)
        torch.testing.assert_close(exits[-1], reference, atol=1e-5, rtol=1e-5)
        stepper = CachedStepper(model, features, None, ids.shape[1])
        for t in range(ids.shape[1]):
            logits, _ = stepper.step(ids[:, t], t)
            torch.testing.assert_close(logits, exits[-1, :, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [MaxProbRule(0.3), MaxProbRule(0.5), SaturationRule(0.9)],
                         ids=["maxprob0.3", "maxprob0.5", "saturation"])
@pytest.mark.parametrize("policy", ["propagate", "deferred", "oracle"])
def test_cached_equals_uncached(llama_captioner, llama_features, rule, policy):
    cached = greedy_decode(llama_captioner, llama_features, rule, MAX_LEN, BOS, EOS, policy=policy)
    uncached = greedy_decode(llama_captioner, llama_features, rule, MAX_LEN, BOS, EOS, policy=policy,
                             stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert cached.token_layers == uncached.token_layers
    assert int(cached.layers.min()) < llama_captioner.num_layers


def test_propagated_kv_is_rotated_at_its_position(llama_captioner, llama_features):
    """project_kv(layer, h, t) == the K/V the layer itself writes for input h at position t."""
    model = llama_captioner
    with torch.inference_mode():
        stepper = CachedStepper(model, llama_features, None, 4)
        for t in range(3):
            stepper.step(torch.full((llama_features.shape[0],), 7 + t), t)
        t = stepper.cache.offset + 2
        hidden = model.embed(torch.full((llama_features.shape[0],), 9), None)
        for index in range(model.num_layers):
            key, value = model.adapter.project_kv(index, hidden, t)
            hidden = model.adapter.step(index, hidden, stepper.cache, None, t)  # writes layer `index` at t
            torch.testing.assert_close(key, stepper.cache.keys[index][:, :, t], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(value, stepper.cache.values[index][:, :, t], atol=1e-6, rtol=1e-5)


def test_batched_equals_one_by_one(llama_captioner, llama_features):
    for policy in ("propagate", "deferred"):
        batched = greedy_decode(llama_captioner, llama_features, MaxProbRule(0.4), MAX_LEN, BOS, EOS, policy=policy)
        single = [greedy_decode(llama_captioner, llama_features[i:i + 1], MaxProbRule(0.4), MAX_LEN, BOS, EOS,
                                policy=policy) for i in range(llama_features.shape[0])]
        assert batched.tokens == [s.tokens[0] for s in single]
        assert batched.token_layers == [s.token_layers[0] for s in single]


def test_beam_never_exit_equals_full_beam_uncached_and_hf(llama_captioner, llama_features):
    model = llama_captioner
    full = beam_decode(model, llama_features, None, 3, MAX_LEN, BOS, EOS)
    never = beam_decode(model, llama_features, NeverExitRule(), 3, MAX_LEN, BOS, EOS)
    reference = beam_decode(model, llama_features, None, 3, MAX_LEN, BOS, EOS, stepper_class=UncachedStepper)
    assert never.tokens == full.tokens == reference.tokens
    with torch.inference_mode():
        assert full.tokens == _hf_generate(model, llama_features, num_beams=3, early_stopping=True, length_penalty=1.0)


def test_beam_early_exit_cached_equals_uncached(llama_captioner, llama_features):
    for policy in ("propagate", "deferred"):
        cached = beam_decode(llama_captioner, llama_features, MaxProbRule(0.4), 3, MAX_LEN, BOS, EOS, policy=policy)
        uncached = beam_decode(llama_captioner, llama_features, MaxProbRule(0.4), 3, MAX_LEN, BOS, EOS, policy=policy,
                               stepper_class=UncachedStepper)
        assert cached.tokens == uncached.tokens
        assert torch.equal(cached.layers, uncached.layers)
        assert int(cached.layers.min()) < llama_captioner.num_layers


class _EveryOther(ExitRule):
    """At the first exit, stops the rows whose (row id + token count) is even; the others run deep."""

    name = "every_other"

    def __init__(self) -> None:
        super().__init__(0.0)
        self.tokens = 0

    def start(self, rows, device):
        self.tokens += 1
        return {"row": torch.arange(rows, device=device)}

    def decide(self, view, state):
        if view.exit_index != 0:
            return torch.zeros(view.logits.shape[0], dtype=torch.bool)
        return (state["row"] + self.tokens) % 2 == 0


def test_deferred_catches_up_to_the_exact_cache(llama_captioner, llama_features):
    """Deferred catch-up chunks (each position rotated at its own place) write the oracle's K/V."""
    model, rows, steps = llama_captioner, llama_features.shape[0], 6
    torch.manual_seed(5)
    teacher = torch.randint(6, 40, (steps, rows))
    with torch.inference_mode():
        deferred = CachedStepper(model, llama_features, _EveryOther(), steps, policy="deferred")
        oracle = CachedStepper(model, llama_features, _EveryOther(), steps, policy="oracle")
        for t in range(steps):
            logits_d, layers_d = deferred.step(teacher[t], t)
            logits_o, layers_o = oracle.step(teacher[t], t)
            assert torch.equal(layers_d, layers_o)
            torch.testing.assert_close(logits_d, logits_o, atol=1e-5, rtol=1e-5)
    assert deferred.catchup_layers > 0
    depth = deferred.cache.depth
    assert int(depth.min()) == 1 and int(depth[:, :deferred.cache.offset].min()) == model.num_layers
    for layer in range(model.num_layers):
        done = depth > layer  # [rows, positions] whose K/V at this layer are written (the prefix included)
        for got, want in ((deferred.cache.keys, oracle.cache.keys), (deferred.cache.values, oracle.cache.values)):
            torch.testing.assert_close(got[layer].transpose(1, 2)[done], want[layer].transpose(1, 2)[done],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [_EveryOther, lambda: MaxProbRule(0.5)], ids=["every_other", "maxprob0.5"])
def test_deferred_equals_oracle_tokens_greedy_and_beam(llama_captioner, llama_features, rule):
    deferred = greedy_decode(llama_captioner, llama_features, rule(), MAX_LEN, BOS, EOS, policy="deferred")
    oracle = greedy_decode(llama_captioner, llama_features, rule(), MAX_LEN, BOS, EOS, policy="oracle")
    assert deferred.tokens == oracle.tokens
    assert deferred.token_layers == oracle.token_layers
    assert deferred.catchup_layers > 0
    beam_deferred = beam_decode(llama_captioner, llama_features, rule(), 3, MAX_LEN, BOS, EOS, policy="deferred")
    beam_oracle = beam_decode(llama_captioner, llama_features, rule(), 3, MAX_LEN, BOS, EOS, policy="oracle")
    assert beam_deferred.tokens == beam_oracle.tokens


@pytest.mark.parametrize("exit_head", ["norm", "adapter"])
def test_subset_exits_and_exit_heads(make_llama_spec, exit_head):
    torch.manual_seed(3)
    model = build_captioner(make_llama_spec(exits=[2, 3], exit_head=exit_head)).eval()
    assert model.exits == [2, 3, 4]
    if exit_head == "norm":  # a per-exit copy of the final RMSNorm
        assert type(model.exit_modules[0]) is type(model.decoder.model.norm)
        assert torch.equal(model.exit_modules[0].weight, model.decoder.model.norm.weight)
    with torch.inference_mode():
        features = model.encode(torch.randn(3, 3, 32, 32))
    cached = greedy_decode(model, features, MaxProbRule(0.3), MAX_LEN, BOS, EOS)
    uncached = greedy_decode(model, features, MaxProbRule(0.3), MAX_LEN, BOS, EOS, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert set(cached.layers.tolist()) <= {2, 3, 4}


def test_training_step_and_save_load_from_a_pretrained_folder(tiny_llama_lm, make_llama_spec, tmp_path):
    """decoder.pretrained = a local HF folder; gradients reach the decoder through the prefix; a
    saved captioner (architecture from the folder, pretrained switched off) reloads equal."""
    tiny_llama_lm.save_pretrained(tmp_path / "hf")
    spec = make_llama_spec(exit_head="norm")
    spec["decoder"] = {"type": "llama", "pretrained": str(tmp_path / "hf")}
    torch.manual_seed(4)
    model = build_captioner(spec)
    assert torch.equal(model.decoder.lm_head.weight, tiny_llama_lm.lm_head.weight)
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([[BOS, 7, 8], [BOS, 9, EOS]])
    logits = model(images, ids)
    logits.float().logsumexp(-1).mean().backward()
    assert model.decoder.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.projection.weight.grad is not None
    model.eval()
    save_captioner(model, tmp_path / "saved")
    again = load_captioner(tmp_path / "saved").eval()
    assert again.adapter.num_kv_heads == 2 and again.exits == model.exits
    with torch.inference_mode():
        torch.testing.assert_close(again(images, ids), model(images, ids))
