"""Exact self-speculative decoding: the same tokens as full greedy decoding for every draft layer E
and draft length k, for LLaMA (prefix) and GPT-2 (cross-attention) captioners and for plain text
generation (== transformers' generate); acceptance counters; the all-accepted path."""

from __future__ import annotations

import pytest
import torch

from llama_testing import BOS, EOS, VOCAB
from mmexit.inference.search import greedy_decode
from mmexit.inference.speculative import speculative_decode
from mmexit.inference.text_generation import generate_ids, generate_text

MAX_LEN = 12


@pytest.mark.parametrize("captioner, eos", [("llama_captioner", EOS), ("gpt2_captioner", 4)])  # eos: a frequent token
def test_speculative_equals_full_greedy_for_every_draft_layer_and_length(captioner, eos, request):
    model = request.getfixturevalue(captioner)
    with torch.inference_mode():
        features = model.encode(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    full = greedy_decode(model, features, None, MAX_LEN, BOS, eos)
    assert len({len(row) for row in full.tokens}) >= 2  # rows stop at EOS at different steps
    rates = []
    for draft_layer in (1, 2, 3):
        for k in (1, 2, 3, 5):
            result = speculative_decode(model, features, draft_layer, k, MAX_LEN, BOS, eos)
            assert result.tokens == full.tokens, (draft_layer, k)
            assert 0 <= result.accepted <= result.drafted <= result.rounds * k
            assert sum(result.row_rounds) == result.rounds
            rates.append(result.acceptance_rate)
    assert max(rates) > 0 and min(rates) < 1  # both branches (accept, correct) are exercised


def test_all_accepted_drafts_commit_k_tokens_per_round(make_llama_spec):
    """Layers after E that add nothing (zero output projections) make the draft the full model:
    every draft is accepted and each round commits k tokens."""
    from mmexit.models.captioner import build_captioner

    torch.manual_seed(0)
    model = build_captioner(make_llama_spec()).eval()
    for block in model.decoder.model.layers[2:]:
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    with torch.inference_mode():
        features = model.encode(torch.randn(2, 3, 32, 32))
    full = greedy_decode(model, features, None, MAX_LEN, BOS, -1)  # no EOS: full length
    result = speculative_decode(model, features, 2, 4, MAX_LEN, BOS, None)
    assert result.tokens == full.tokens
    assert result.acceptance_rate == 1.0 and result.rounds == 2 * MAX_LEN // 4
    assert result.tokens_per_round == 4.0


def test_draft_layer_must_be_an_internal_exit(llama_captioner, llama_features):
    with pytest.raises(ValueError, match="internal exit"):
        speculative_decode(llama_captioner, llama_features, 4, 2, MAX_LEN, BOS, EOS)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_decode(llama_captioner, llama_features, 2, 0, MAX_LEN, BOS, EOS)


def _hf(model, ids, new_tokens):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("prompt_length", [1, 7])
def test_text_generation_equals_hf_generate(tiny_llama_lm, prompt_length):
    torch.manual_seed(prompt_length)
    ids = torch.randint(6, VOCAB, (1, prompt_length))
    reference = _hf(tiny_llama_lm, ids, 20)
    assert generate_ids(tiny_llama_lm, ids, 20, eos_id=EOS).tokens == reference
    for draft_layer in (1, 2, 3):
        for k in (2, 4):
            generation = generate_ids(tiny_llama_lm, ids, 20, draft_layer, k, eos_id=EOS)
            assert generation.tokens == reference, (draft_layer, k)
            assert generation.speculative.draft_layer == draft_layer
            assert 0.0 <= generation.speculative.acceptance_rate <= 1.0


def test_text_generation_stops_at_the_models_eos(tiny_llama_lm):
    """Find a prompt whose continuation reaches EOS; both paths stop there, like generate."""
    for seed in range(50):
        ids = torch.randint(6, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))
        reference = _hf(tiny_llama_lm, ids, 24)
        if EOS in reference and len(reference) < 24:
            break
    else:
        pytest.skip("no prompt reaches EOS")
    assert reference[-1] == EOS
    assert generate_ids(tiny_llama_lm, ids, 24).tokens == reference  # eos from the model's config
    assert generate_ids(tiny_llama_lm, ids, 24, draft_layer=2, draft_tokens=3).tokens == reference


def test_generate_text_with_a_tokenizer(tiny_llama_lm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "x", "y", "z", "</s>"] + [f"w{i}" for i in range(6, VOCAB)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="x"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    prompt = "w7 w12 w30 w9"
    plain = generate_text(tiny_llama_lm, tokenizer, prompt, 10)
    fast = generate_text(tiny_llama_lm, tokenizer, prompt, 10, draft_layer=3, draft_tokens=3)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert plain.tokens == fast.tokens == _hf(tiny_llama_lm, ids, 10)
    assert plain.text == fast.text == tokenizer.decode(plain.tokens, skip_special_tokens=True) and plain.text
    assert plain.speculative is None and fast.speculative.drafted > 0
