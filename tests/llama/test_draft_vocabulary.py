"""A draft over a short vocabulary (FR-Spec) and confidence-stopped drafts keep self-speculative
decoding exact; the LM head's selected rows are computed once per weight version; the frequent
tokens of a corpus."""

from __future__ import annotations

import pytest
import torch

from llama_testing import BOS, EOS, VOCAB, llama_spec
from mmexit.inference.draft_vocabulary import frequent_tokens
from mmexit.inference.search import greedy_decode
from mmexit.inference.speculative import speculative_decode
from mmexit.models.captioner import build_captioner

MAX_LEN = 12
HEAD_IDS = [0, 1, 2, 3, 5, 7, 8, 11, 13, 17, 19, 23, 29, 31, 37]  # a caption vocabulary (EOS 5 in it)


@pytest.fixture(scope="module")
def head_ids_captioner():
    torch.manual_seed(0)
    return build_captioner({**llama_spec(exit_head="adapter"), "head_ids": HEAD_IDS}).eval()


def test_exit_scores_are_the_exit_logits_of_those_tokens(head_ids_captioner):
    model = head_ids_captioner
    hidden = torch.randn(3, 32)
    ids = torch.tensor([2, 7, 23, 37])
    with torch.inference_mode():
        for exit_index in range(model.num_exits):
            logits = model.exit_logits(exit_index, hidden)
            assert torch.allclose(model.exit_scores(exit_index, hidden, ids), logits[:, ids], atol=1e-6)
            outside = torch.ones(VOCAB, dtype=torch.bool)
            outside[HEAD_IDS] = False
            assert (logits[:, outside] <= -1e8).all()  # tokens outside the caption vocabulary never win


def test_head_rows_are_selected_once_per_weight_version(head_ids_captioner):
    model = head_ids_captioner
    head = model.decoder.lm_head
    with torch.inference_mode():
        first = model.head_rows.rows(head, model.head_ids)[0]
        assert model.head_rows.rows(head, model.head_ids)[0] is first  # reused, not copied again
    with torch.no_grad():
        head.weight[HEAD_IDS[3]] += 1.0  # an in-place update (an optimiser step) is seen
        try:
            again = model.head_rows.rows(head, model.head_ids)[0]
            assert again is not first and torch.equal(again, head.weight[model.head_ids])
        finally:
            head.weight[HEAD_IDS[3]] -= 1.0


def test_with_gradients_the_rows_are_selected_afresh_and_training_reaches_the_head():
    torch.manual_seed(0)
    model = build_captioner({**llama_spec(), "head_ids": HEAD_IDS})
    with torch.inference_mode():
        model.exit_logits(0, torch.randn(2, 32))  # fills the cache
    loss = model.exit_logits(model.num_exits - 1, torch.randn(2, 32))[:, HEAD_IDS].logsumexp(-1).sum()
    loss.backward()
    grad = model.decoder.lm_head.weight.grad
    assert grad is not None and grad[HEAD_IDS].abs().sum() > 0


@pytest.mark.parametrize("confidence", [None, 0.2, 1.0])
def test_a_short_draft_vocabulary_keeps_the_tokens_of_full_greedy(head_ids_captioner, confidence):
    model = head_ids_captioner
    with torch.inference_mode():
        features = model.encode(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    full = greedy_decode(model, features, None, MAX_LEN, BOS, EOS)
    emitted = {token for row in full.tokens for token in row}
    short = torch.tensor(sorted(set(HEAD_IDS[:6]) | {EOS}))  # misses tokens the full model emits
    assert emitted - set(short.tolist())
    for draft_layer in (1, 2, 3):
        result = speculative_decode(model, features, draft_layer, 3, MAX_LEN, BOS, EOS, short, confidence)
        assert result.tokens == full.tokens, (draft_layer, confidence)
        if confidence == 1.0:  # no draft is that sure: one drafted token per round
            assert result.drafted == result.rounds
        else:
            assert result.drafted > result.rounds


def test_the_draft_options_are_checked(head_ids_captioner):
    from mmexit.inference.text_generation import TextDecoder  # a model without exit_scores
    from transformers import LlamaConfig, LlamaForCausalLM

    features = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="confidence"):
        speculative_decode(head_ids_captioner, features, 2, 2, MAX_LEN, BOS, EOS, None, 1.5)
    lm = TextDecoder(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2)), exits=[1])
    with pytest.raises(ValueError, match="exit_scores"):
        speculative_decode(lm, features, 1, 2, MAX_LEN, BOS, EOS, torch.tensor([1, 2]))


def test_frequent_tokens_rank_by_count_within_the_allowed_ids():
    words = {"a": 3, "dog": 4, "runs": 5, "the": 6, "rare": 7, "odd": 9}
    texts = ["a dog runs", "a dog", "a the", "a rare", "odd odd odd odd odd"]

    def encode(text):
        return [words[w] for w in text.split()]

    vocabulary = frequent_tokens(encode, texts, 2, always=[2], allowed=torch.tensor([2, 3, 4, 5, 6, 7]))
    # counts among allowed ids: a 4, dog 2, EOS 5 (one per text); odd (9) is not allowed
    assert vocabulary.ids.tolist() == [2, 3]
    assert vocabulary.coverage == pytest.approx(9 / 14)
    assert frequent_tokens(encode, texts, 3, always=[2]).ids.tolist() == [2, 3, 9]  # odd 5 ties EOS 5: both
    with pytest.raises(ValueError, match="size"):
        frequent_tokens(encode, texts, 0)
