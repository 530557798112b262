"""The self-speculative cost model (``mmexit.inference.speculative_cost``): its arithmetic."""

import pytest

from mmexit.inference.speculative_cost import PartCosts, acceptance_needed, predicted_speedup, tokens_per_round


def flat_costs(span_growth: float = 0.0, prefill: float = 0.0) -> PartCosts:
    """10 layers at 1.0 per position-step; a chunk of n positions costs 1 + span_growth x (n - 1)."""
    spans = {n: 1.0 + span_growth * (n - 1) for n in range(1, 9)}
    return PartCosts(layers=10, step=1.0, span=spans, draft_head=0.0, final_head={n: 0.0 for n in range(1, 9)},
                     prefill=prefill)


def test_tokens_per_round_is_the_geometric_sum():
    assert tokens_per_round(1.0, 4) == 4
    assert tokens_per_round(0.0, 4) == 1
    assert tokens_per_round(0.5, 3) == pytest.approx(1.75)


def test_a_free_verify_gives_the_layer_ratio():
    # the verify chunk costs one position's layers whatever its length: k tokens for k x E + (L - E)
    costs = flat_costs(span_growth=0.0)
    assert predicted_speedup(costs, draft_layer=2, drafts=4, per_round=4) == pytest.approx(4 * 10 / (4 * 2 + 8))


def test_a_verify_that_costs_per_position_never_pays():
    # when n positions cost n single ones, a round costs at least k full tokens: no speed-up at all
    costs = flat_costs(span_growth=1.0)
    for layer in (1, 5, 9):
        for k in (1, 2, 4):
            assert predicted_speedup(costs, layer, k, per_round=k) <= 1.0 + 1e-9


def test_prefill_dilutes_the_speed_up():
    fast = predicted_speedup(flat_costs(), 2, 4, 4, tokens_per_sequence=10)
    diluted = predicted_speedup(flat_costs(prefill=50.0), 2, 4, 4, tokens_per_sequence=10)
    assert 1.0 < diluted < fast
    with pytest.raises(ValueError, match="tokens_per_sequence"):
        predicted_speedup(flat_costs(prefill=50.0), 2, 4, 4)


def test_acceptance_needed_reaches_the_target_or_says_it_cannot():
    costs = flat_costs(span_growth=0.1)
    needed = acceptance_needed(costs, draft_layer=2, drafts=4, target=1.5)
    assert needed is not None and 0.0 < needed < 1.0
    assert predicted_speedup(costs, 2, 4, tokens_per_round(needed, 4)) == pytest.approx(1.5, rel=1e-6)
    assert predicted_speedup(costs, 2, 4, tokens_per_round(needed - 0.01, 4)) < 1.5
    assert acceptance_needed(costs, draft_layer=2, drafts=4, target=5.0) is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="draft_layer"):
        flat_costs().round(10, 2)
    with pytest.raises(ValueError, match="tokens per round"):
        predicted_speedup(flat_costs(), 2, 2, 0.0)
