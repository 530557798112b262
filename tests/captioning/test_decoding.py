"""Equivalence of the per-token early-exit decoder: never-exit == full greedy == HF generate,
cached == uncached, batched == one-by-one, beam with never-exit == full beam; rows really leave."""

from __future__ import annotations

import pytest
import torch

from mmexit.inference.search import beam_decode, greedy_decode
from mmexit.inference.stepper import CachedStepper
from uncached_stepper import UncachedStepper
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.exits.saturation import SaturationRule

MAX_LEN = 12
BOS, EOS = 1, 2


def _generate(model, features, **kwargs):
    out = model.decoder.generate(input_ids=torch.full((features.shape[0], 1), BOS), encoder_hidden_states=features,
                                 max_new_tokens=MAX_LEN, do_sample=False, eos_token_id=EOS, pad_token_id=0, **kwargs)
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def test_never_exit_equals_full_greedy_and_hf_generate(tiny_captioner, tiny_features):
    full = greedy_decode(tiny_captioner, tiny_features, None, MAX_LEN, BOS, EOS)
    never = greedy_decode(tiny_captioner, tiny_features, NeverExitRule(), MAX_LEN, BOS, EOS)
    assert any(EOS in row for row in full.tokens), "test needs rows that finish early"
    assert never.tokens == full.tokens
    assert never.tokens == _generate(tiny_captioner, tiny_features)
    assert int(never.layers.min()) == tiny_captioner.num_layers


@pytest.mark.parametrize("rule", [MaxProbRule(0.3), MaxProbRule(0.5), SaturationRule(0.9), NeverExitRule()],
                         ids=["maxprob0.3", "maxprob0.5", "saturation", "never"])
@pytest.mark.parametrize("policy", ["propagate", "deferred", "oracle"])
def test_cached_equals_uncached(tiny_captioner, tiny_features, rule, policy):
    cached = greedy_decode(tiny_captioner, tiny_features, rule, MAX_LEN, BOS, EOS, policy=policy)
    uncached = greedy_decode(tiny_captioner, tiny_features, rule, MAX_LEN, BOS, EOS, policy=policy, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert cached.token_layers == uncached.token_layers


def test_early_exit_really_exits_and_differs_from_oracle_kv(tiny_captioner, tiny_features):
    result = greedy_decode(tiny_captioner, tiny_features, MaxProbRule(0.3), MAX_LEN, BOS, EOS)
    layers = result.layers
    assert int(layers.min()) < tiny_captioner.num_layers  # some tokens left early
    assert len(set(layers.tolist())) >= 2  # rows of one batch exit at different layers
    assert not result.simulated
    assert greedy_decode(tiny_captioner, tiny_features, MaxProbRule(0.3), MAX_LEN, BOS, EOS, policy="oracle").simulated


def test_batched_equals_one_by_one(tiny_captioner, tiny_features):
    rule = MaxProbRule(0.4)
    batched = greedy_decode(tiny_captioner, tiny_features, rule, MAX_LEN, BOS, EOS)
    single = [greedy_decode(tiny_captioner, tiny_features[i:i + 1], rule, MAX_LEN, BOS, EOS)
              for i in range(tiny_features.shape[0])]
    assert batched.tokens == [s.tokens[0] for s in single]
    assert batched.token_layers == [s.token_layers[0] for s in single]


class _Spy(ExitRule):
    """Stops every other row at the first exit; records how many rows each exit sees."""

    name = "spy"

    def __init__(self) -> None:
        super().__init__(0.0)
        self.rows: list[tuple[int, int]] = []

    def decide(self, view, state):
        self.rows.append((view.exit_index, view.logits.shape[0]))
        stop = torch.zeros(view.logits.shape[0], dtype=torch.bool)
        if view.exit_index == 0:
            stop[::2] = True
        return stop


def test_exited_rows_leave_the_layer_computation(tiny_captioner, tiny_features):
    spy = _Spy()
    greedy_decode(tiny_captioner, tiny_features, spy, 1, BOS, EOS)
    rows = tiny_features.shape[0]
    assert spy.rows[0] == (0, rows)
    assert spy.rows[1] == (1, rows - (rows + 1) // 2)


def test_beam_never_exit_equals_full_beam_and_hf(tiny_captioner, tiny_features):
    full = beam_decode(tiny_captioner, tiny_features, None, 3, MAX_LEN, BOS, EOS)
    never = beam_decode(tiny_captioner, tiny_features, NeverExitRule(), 3, MAX_LEN, BOS, EOS)
    reference = beam_decode(tiny_captioner, tiny_features, None, 3, MAX_LEN, BOS, EOS, stepper_class=UncachedStepper)
    assert never.tokens == full.tokens == reference.tokens
    assert full.tokens == _generate(tiny_captioner, tiny_features, num_beams=3, early_stopping=True, length_penalty=1.0)


def test_beam_early_exit_cached_equals_uncached(tiny_captioner, tiny_features):
    rule = MaxProbRule(0.4)
    cached = beam_decode(tiny_captioner, tiny_features, rule, 3, MAX_LEN, BOS, EOS)
    uncached = beam_decode(tiny_captioner, tiny_features, rule, 3, MAX_LEN, BOS, EOS, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert torch.equal(cached.layers, uncached.layers)
    assert int(cached.layers.min()) < tiny_captioner.num_layers


@pytest.mark.parametrize("exit_head", ["norm", "adapter"])
def test_subset_exits_and_exit_heads(make_spec, exit_head):
    from mmexit.models.captioner import build_captioner

    torch.manual_seed(3)
    model = build_captioner(make_spec(n_layer=4, exits=[2, 3], exit_head=exit_head)).eval()
    assert model.exits == [2, 3, 4]
    with torch.inference_mode():
        features = model.encode(torch.randn(3, 3, 32, 32))
    rule = MaxProbRule(0.3)
    cached = greedy_decode(model, features, rule, MAX_LEN, BOS, EOS)
    uncached = greedy_decode(model, features, rule, MAX_LEN, BOS, EOS, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert set(cached.layers.tolist()) <= {2, 3, 4}


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


def test_deferred_catches_up_to_the_exact_cache(tiny_captioner, tiny_features):
    """Deferred compute writes the K/V the full model would: equal to the oracle's cache, position by position."""
    model, rows, steps = tiny_captioner, tiny_features.shape[0], 7
    torch.manual_seed(5)
    teacher = torch.randint(3, 30, (steps, rows))
    with torch.inference_mode():
        deferred = CachedStepper(model, tiny_features, _EveryOther(), steps, policy="deferred")
        oracle = CachedStepper(model, tiny_features, _EveryOther(), steps, policy="oracle")
        for t in range(steps):
            logits_d, layers_d = deferred.step(teacher[t], t)
            logits_o, layers_o = oracle.step(teacher[t], t)
            assert torch.equal(layers_d, layers_o)
            assert torch.allclose(logits_d, logits_o, atol=1e-5)
    assert deferred.catchup_layers > 0
    depth = deferred.cache.depth
    assert int(depth.min()) == 1 and int(depth.max()) == model.num_layers  # the last shallow tokens still wait
    for layer in range(model.num_layers):
        done = depth > layer  # [rows, steps] positions whose K/V at this layer are written
        for store_d, store_o in ((deferred.cache.keys, oracle.cache.keys), (deferred.cache.values, oracle.cache.values)):
            got, want = store_d[layer].transpose(1, 2)[done], store_o[layer].transpose(1, 2)[done]
            assert torch.allclose(got, want, atol=1e-5), layer


@pytest.mark.parametrize("rule", [_EveryOther, lambda: MaxProbRule(0.5), lambda: SaturationRule(0.9)],
                         ids=["every_other", "maxprob0.5", "saturation"])
def test_deferred_equals_oracle_tokens_batched_and_beam(tiny_captioner, tiny_features, rule):
    deferred = greedy_decode(tiny_captioner, tiny_features, rule(), MAX_LEN, BOS, EOS, policy="deferred")
    oracle = greedy_decode(tiny_captioner, tiny_features, rule(), MAX_LEN, BOS, EOS, policy="oracle")
    assert deferred.tokens == oracle.tokens
    assert deferred.token_layers == oracle.token_layers
    assert not deferred.simulated and oracle.simulated
    if rule is not _EveryOther:  # its decisions depend on the row's place in the batch
        single = [greedy_decode(tiny_captioner, tiny_features[i:i + 1], rule(), MAX_LEN, BOS, EOS, policy="deferred")
                  for i in range(tiny_features.shape[0])]
        assert deferred.tokens == [s.tokens[0] for s in single]
        assert deferred.catchup_layers == sum(s.catchup_layers for s in single)
    else:
        assert deferred.catchup_layers > 0
    beam_deferred = beam_decode(tiny_captioner, tiny_features, rule(), 3, MAX_LEN, BOS, EOS, policy="deferred")
    beam_oracle = beam_decode(tiny_captioner, tiny_features, rule(), 3, MAX_LEN, BOS, EOS, policy="oracle")
    assert beam_deferred.tokens == beam_oracle.tokens


def test_rules_without_logits_ask_the_lm_head_only_where_rows_stop(tiny_captioner, tiny_features, monkeypatch):
    """Saturation reads no logits: each generated token costs one exit-head call on its own row."""
    rows_seen = []
    original = tiny_captioner.exit_logits

    def counting(exit_index, hidden):
        rows_seen.append(hidden.shape[0])
        return original(exit_index, hidden)

    monkeypatch.setattr(tiny_captioner, "exit_logits", counting)
    result = greedy_decode(tiny_captioner, tiny_features, SaturationRule(0.5), MAX_LEN, BOS, EOS)
    assert int(result.layers.min()) < tiny_captioner.num_layers
    assert sum(rows_seen) == result.layers.numel()
    rows_seen.clear()
    greedy_decode(tiny_captioner, tiny_features, MaxProbRule(0.5), MAX_LEN, BOS, EOS)
    assert sum(rows_seen) > result.layers.numel()  # confidence rules ask every exit on the way


@pytest.mark.parametrize("policy", ["propagate", "deferred"])
def test_cross_attention_kv_computed_only_for_layers_some_row_runs(tiny_captioner, tiny_features, policy, monkeypatch):
    """The step-synchronous cache computes a layer's cross-attention K/V at the layer's first call (for
    every row at once): a layer no token runs never pays for them, and tokens equal the uncached
    decoder's (the K/V are the same whenever computed)."""
    adapter, computed = tiny_captioner.adapter, []
    original = adapter.init_cache_layer

    def spy(index, features):
        computed.append(index)
        return original(index, features)

    monkeypatch.setattr(adapter, "init_cache_layer", spy)
    first_exit = tiny_captioner.exits[0]
    result = greedy_decode(tiny_captioner, tiny_features, _StopFirst(), MAX_LEN, BOS, EOS, policy=policy)
    assert int(result.layers.max()) == first_exit < tiny_captioner.num_layers
    assert computed == list(range(first_exit))  # the layers every token ran, once each
    computed.clear()
    rule = MaxProbRule(0.4)
    cached = greedy_decode(tiny_captioner, tiny_features, rule, MAX_LEN, BOS, EOS, policy=policy)
    assert len(computed) == len(set(computed))  # once per layer
    if policy == "propagate":  # (deferred also runs skipped layers when it catches up)
        assert sorted(computed) == list(range(int(cached.layers.max())))
    uncached = greedy_decode(tiny_captioner, tiny_features, rule, MAX_LEN, BOS, EOS, policy=policy,
                             stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens


class _StopFirst(ExitRule):
    """Stops every token at the first exit (reads no logits)."""

    name = "stop_first"
    needs_logits = False

    def __init__(self) -> None:
        super().__init__(0.0)

    def decide(self, view, state):
        return torch.ones(view.hidden.shape[0], dtype=torch.bool)
