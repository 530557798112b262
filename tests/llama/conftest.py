"""Tiny random LLaMA decoders built in code (no downloads): a prefix captioner and a plain causal LM.

4 layers, width 32, 4 query heads / 2 KV heads (grouped-query attention), RoPE, RMSNorm, SwiGLU,
vocabulary 40. The uncached reference stepper is shared with the GPT-2 tests (tests/captioning).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "captioning"))  # uncached_stepper
sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama_testing

from mmexit.models.captioner import build_captioner  # noqa: E402

from llama_testing import BOS, EOS, LLAMA, PAD, VOCAB, llama_spec  # noqa: E402
from mmexit_testing import one_torch_thread  # noqa: E402


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="session")
def llama_captioner():
    torch.manual_seed(0)
    return build_captioner(llama_spec()).eval()


@pytest.fixture(scope="session")
def llama_features(llama_captioner):
    """Image prefixes [6, 4, 32] (4 patches of a 32x32 image)."""
    torch.manual_seed(1)
    with torch.inference_mode():
        return llama_captioner.encode(torch.randn(6, 3, 32, 32))


@pytest.fixture(scope="session")
def make_llama_spec():
    return llama_spec


@pytest.fixture(scope="session")
def gpt2_captioner():
    """The tiny GPT-2 (cross-attention) captioner of tests/captioning, for the speculative tests."""
    spec = llama_spec()
    spec["decoder"] = {"type": "gpt2", "config": {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 24,
                                                  "initializer_range": 0.3}}
    torch.manual_seed(0)
    return build_captioner(spec).eval()


@pytest.fixture(scope="session")
def tiny_llama_lm():
    """A plain LlamaForCausalLM (text generation), random weights, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         tie_word_embeddings=True, attn_implementation="sdpa", **LLAMA)
    return LlamaForCausalLM(config).eval()
