"""Plain text generation with a LLaMA-family causal LM through mmexit's decoder engine.

``generate_ids`` / ``generate_text`` continue a prompt greedily, either
(a) with plain KV-cached greedy decoding through ``LlamaDecoderAdapter`` (``greedy_decode``, the
    full model, no exits), or
(b) with exact self-speculative decoding (``speculative_decode``): the first ``draft_layer`` layers
    plus the model's own final RMSNorm and LM head draft ``draft_tokens`` tokens, the full model
    verifies them in one pass. Same tokens as (a) and as ``model.generate(do_sample=False)``.
The prompt but its last token is the cache prefix (``prefill``); the last prompt token is the first
input of decoding, at position P-1. One prompt at a time (batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mmexit.inference.search import greedy_decode
from mmexit.inference.speculative import SpeculativeResult, speculative_decode
from mmexit.models.adapters.llama import LlamaDecoderAdapter


class TextDecoder:
    """A ``LlamaForCausalLM`` seen as a multi-exit decoder model (what the stepper and the
    speculative decoder read): exits after ``exits`` (1-based) and the last layer, every exit head
    being the model's own final norm + LM head (no new parameters)."""

    def __init__(self, model: nn.Module, exits: Sequence[int] = ()) -> None:
        self.adapter = LlamaDecoderAdapter(model)
        self.num_layers = self.adapter.num_layers
        self.exits = sorted({int(e) for e in exits} | {self.num_layers})
        if self.exits[0] < 1:
            raise ValueError(f"exit layers must be in 1..{self.num_layers}, got {list(exits)}")

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings [..., width] (RoPE positions act inside attention)."""
        return self.adapter.embed(tokens, positions)

    def exit_logits(self, exit_index: int, hidden: Tensor) -> Tensor:
        """Logits [..., vocab] = lm_head(final_norm(hidden [..., width])), at every exit."""
        return self.adapter.lm_head(self.adapter.final_norm(hidden))


@dataclass
class Generation:
    """tokens: the continuation's ids (EOS included when produced); text: decoded (special tokens
    skipped); speculative: draft/acceptance counters (None for plain greedy)."""

    tokens: list[int]
    text: str = ""
    speculative: Optional[SpeculativeResult] = None


def default_eos(model: nn.Module) -> Optional[int]:
    """The model's end-of-sequence id (the first one when the generation config lists several)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


@torch.inference_mode()
def generate_ids(model: nn.Module, input_ids: Tensor, max_new_tokens: int = 48, draft_layer: Optional[int] = None,
                 draft_tokens: int = 3, eos_id: Optional[int] | str = "model") -> Generation:
    """Greedy continuation of input_ids [1, P] (P >= 1): plain cached greedy when ``draft_layer`` is
    None, else self-speculative with the exit at layer ``draft_layer`` (1-based, < num layers).
    eos_id: "model" (the model's EOS), an id, or None (never stop early)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [1, P] with P >= 1, got {tuple(input_ids.shape)}")
    eos = default_eos(model) if eos_id == "model" else eos_id
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    decoder = TextDecoder(model, [draft_layer] if draft_layer is not None else [])
    prefix = decoder.embed(input_ids[:, :-1], None)  # [1, P-1, width]: the cache prefix
    last = int(input_ids[0, -1])
    if draft_layer is None:
        result = greedy_decode(decoder, prefix, None, max_new_tokens, bos_id=last, eos_id=-1 if eos is None else eos)
        return Generation(result.tokens[0])
    spec = speculative_decode(decoder, prefix, draft_layer, draft_tokens, max_new_tokens, bos_id=last, eos_id=eos)
    return Generation(spec.tokens[0], speculative=spec)


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48,
                  draft_layer: Optional[int] = None, draft_tokens: int = 3) -> Generation:
    """Continue ``prompt`` greedily (see ``generate_ids``); ``text`` is the decoded continuation."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    generation = generate_ids(model, input_ids, max_new_tokens, draft_layer, draft_tokens)
    generation.text = tokenizer.decode(generation.tokens, skip_special_tokens=True)
    return generation
