"""LLaMA-family decoders (``LlamaForCausalLM``) behind mmexit's decoder adapter.

``LlamaDecoderAdapter`` implements ``mmexit.models.adapters.decoder_protocol.DecoderAdapter`` (the
interface the captioner and the decoding engine call, with shapes) for a decoder with RMSNorm,
rotary positions (RoPE), grouped-query attention (``num_kv_heads`` <= ``num_heads``) and a SwiGLU
MLP. The maths calls the model's own modules: ``input_layernorm``,
``self_attn.q_proj/k_proj/v_proj/o_proj``, ``post_attention_layernorm``, ``mlp``, ``model.norm``,
``lm_head``, ``model.rotary_emb`` (cos/sin) and transformers' ``apply_rotary_pos_emb``.

A LLaMA decoder has no cross-attention: the image (or a text prompt) is a *prefix* of input
embeddings [rows, P, width] at positions 0..P-1. ``prefix_length`` is P; ``prefill`` runs the
prefix through every layer once and writes its K/V; caption position t is cache position P + t.
K/V are stored after RoPE (rotated at their absolute position), so ``project_kv`` (state
propagation) rotates at the position it is given too.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.decoder_protocol import DecoderAdapter
from mmexit.models.kv_cache import DecoderCache, chunk_layout, span_mask
from mmexit.models.slot_cache import SlotCache
from mmexit.sources import resolve_packaged

#: LlamaConfig keys that rebuild a decoder's shape (saved with a trained captioner)
ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                     "rope_parameters", "hidden_act", "attention_bias", "mlp_bias", "tie_word_embeddings")


def build_llama_decoder(vocab_size: int, pretrained: str | None = None, special_ids: dict | None = None,
                        **config: Any) -> nn.Module:
    """LlamaForCausalLM: random init from LlamaConfig keys (tied embeddings unless told), or a local
    HF folder / hub name / packaged source (``pypi:smollm2-135m``); the vocabulary is resized to
    ``vocab_size`` when it differs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if pretrained:
        if pretrained.startswith("pypi:"):
            pretrained = str(resolve_packaged(pretrained))
        try:
            decoder = LlamaForCausalLM.from_pretrained(pretrained, attn_implementation="sdpa", dtype=torch.float32)
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"LLaMA decoder {pretrained!r} cannot be loaded (offline?): {message}") from None
        if decoder.config.vocab_size != vocab_size:
            decoder.resize_token_embeddings(vocab_size)
        return decoder
    ids = {f"{key}_token_id": value for key, value in (special_ids or {}).items()}
    config.setdefault("tie_word_embeddings", True)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, attn_implementation="sdpa", **ids, **config))


class LlamaDecoderAdapter(DecoderAdapter):
    """LLaMA blocks: RMSNorm -> RoPE grouped-query self-attention -> RMSNorm -> SwiGLU MLP."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        config = decoder.config
        self.width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.width // self.num_heads
        self.vocab_size = config.vocab_size
        rope = getattr(config, "rope_parameters", None) or {}
        self._static_rope = rope.get("rope_type", "default") == "default"  # cos/sin depend on the position only
        self._rope_table: Optional[tuple[Tensor, Tensor]] = None

    # ------------------------------------------------------------------ pieces both paths read
    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings [..., width]; positions are unused (RoPE acts inside attention)."""
        return self.decoder.model.embed_tokens(tokens)

    def embed_dropout(self, hidden: Tensor) -> Tensor:
        return hidden

    @property
    def norm_module(self) -> nn.Module:
        """The final RMSNorm; a per-exit ``norm`` head starts as a copy of it."""
        return self.decoder.model.norm

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.decoder.model.norm(hidden)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.decoder.lm_head(hidden)

    def rotary(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [*positions.shape, head_dim] from the model's ``rotary_emb`` (dtype of ``like``)."""
        rotary_emb = self.decoder.model.rotary_emb
        if not self._static_rope:
            cos, sin = rotary_emb(like, positions.reshape(1, -1))
            return cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        table = self._rope_table
        if (table is None or table[0].shape[0] < needed or table[0].dtype != like.dtype
                or table[0].device != like.device or (table[0].is_inference() and not torch.is_inference_mode_enabled())):
            length = max(needed, 2 * (table[0].shape[0] if table is not None else 64))
            cos, sin = rotary_emb(like, torch.arange(length, device=like.device)[None])
            self._rope_table = table = (cos[0], sin[0])  # elementwise in the position: equal to per-call values
        return table[0][positions], table[1][positions]

    def layer(self, index: int, hidden: Tensor, features: Tensor) -> Tensor:
        """Teacher-forced block ``index`` (transformers' ``LlamaDecoderLayer``, causal sdpa, no mask).

        hidden [B, P + T, width]: the prefix and the caption together (``Captioner.forward_exits``
        puts them there); features are not read again (the prefix is in ``hidden``).
        """
        if self.decoder.config._attn_implementation != "sdpa":  # eager attention without a mask is not causal
            raise ModelLoadError("LLaMA decoder: teacher-forced layers need attn_implementation='sdpa'")
        cos, sin = self.rotary(torch.arange(hidden.shape[1], device=hidden.device), hidden)
        return self.blocks[index](hidden, attention_mask=None, position_embeddings=(cos[None], sin[None]))

    # ---------------------------------------------------------------- cached one-position maths
    def init_cache_layer(self, index: int, features: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """No per-layer constants (no cross-attention)."""
        return None

    def prefix_length(self, features: Tensor) -> int:
        """The image (prompt) prefix takes cache positions 0..P-1; features [rows, P, width]."""
        return int(features.shape[1])

    def prefill(self, cache: DecoderCache, features: Tensor) -> None:
        """Run the prefix embeddings [rows, P, width] through every layer, writing K/V at 0..P-1."""
        hidden = features
        for index in range(self.num_layers):
            hidden = self.span(index, hidden, cache, None, 0)

    def _qkv(self, block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [r, n, width]; cos/sin [1 or r, n, hd] -> query [r, heads, n, hd], key/value [r, kv_heads, n, hd]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        r, n, _ = hidden.shape
        attention = block.self_attn
        normed = block.input_layernorm(hidden)
        query = attention.q_proj(normed).view(r, n, -1, self.head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(r, n, -1, self.head_dim).transpose(1, 2)
        value = attention.v_proj(normed).view(r, n, -1, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        return query, key, value

    def _finish(self, block: nn.Module, hidden: Tensor, query: Tensor, keys: Tensor, values: Tensor,
                mask: Optional[Tensor]) -> Tensor:
        """Attention of query [r, heads, n, hd] over keys/values [r, kv_heads, m, hd], o_proj, residual, MLP."""
        r, n, _ = hidden.shape
        attention = block.self_attn
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attention.scaling,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(r, n, -1))
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def step(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], t: int) -> Tensor:
        """Layer ``index`` for one new cache position t; hidden [r, width]; rows: cache rows (None = all)."""
        return self.span(index, hidden[:, None], cache, rows, t)[:, 0]

    def step_rows(self, index: int, hidden: Tensor, cache: SlotCache, rows: Tensor, positions: Tensor,
                  length: Optional[int] = None) -> Tensor:
        """Layer ``index`` for one new position per row, each at its own cache position (and rotary
        position; the continuous decoder's ``SlotCache``). hidden [r, width]; rows [r] cache rows;
        positions [r] cache positions (K/V written there, the query reads 0..own position); length:
        max(positions) + 1 if known. -> [r, width].
        With the rows and positions of the cache's ``RowsPlan`` their cos/sin are computed once per
        plan. Tokens the cache folded into this layer's call (``SlotCache.take_folded``: state
        propagation of tokens that skipped it) go through the same norm and projections, each at its
        own rotary position; their K/V are written first."""
        block = self.blocks[index]
        folded = cache.take_folded(index)
        hidden = hidden[:, None]  # [r, 1, width]
        cos, sin = self._rows_rotary(cache, rows, positions, hidden)  # [r, 1, hd]
        if folded is None:
            query, key, value = self._qkv(block, hidden, cos, sin)
        else:
            r = hidden.shape[0]
            folded_cos, folded_sin = self.rotary(folded.positions, hidden)  # [m, hd]
            query, key, value = self._qkv(block, torch.cat([hidden, folded.hidden[:, None]]),
                                          torch.cat([cos, folded_cos[:, None]]), torch.cat([sin, folded_sin[:, None]]))
            cache.write_folded(index, folded, torch.stack([key[r:, :, 0], value[r:, :, 0]], 1))
            query, key, value = query[:r], key[:r], value[:r]
        keys, values, mask = cache.write_rows_and_read(index, rows, positions, key[:, :, 0], value[:, :, 0], length)
        return self._finish(block, hidden, query, keys, values, mask)[:, 0]

    step_rows.takes_folded = True  # it projects the K/V of the rows a SlotCache folds into the call

    def _rows_rotary(self, cache: SlotCache, rows: Tensor, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [r, 1, hd] of positions [r] for ``step_rows``; kept in the cache's ``RowsPlan`` of
        these rows when there is one (a group of rows runs layer after layer at the same positions)."""
        plan = cache.plan
        memo = plan.memo if plan is not None and plan.matches(rows, positions) else None
        if memo is not None and memo.get("rope_dtype") == like.dtype:
            return memo["rope"]
        cos, sin = self.rotary(positions, like)  # [r, hd]
        cos, sin = cos[:, None], sin[:, None]
        if memo is not None:
            memo["rope"], memo["rope_dtype"] = (cos, sin), like.dtype
        return cos, sin

    def span(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], start: int) -> Tensor:
        """Layer ``index`` for new positions start..start+n-1 (causal); hidden [r, n, width] -> [r, n, width]."""
        block = self.blocks[index]
        n = hidden.shape[1]
        cos, sin = self.rotary(torch.arange(start, start + n, device=hidden.device), hidden)
        query, key, value = self._qkv(block, hidden, cos[None], sin[None])
        keys, values = cache.write_span_and_read(index, rows, start, key, value)
        return self._finish(block, hidden, query, keys, values, span_mask(start, n, hidden.device))

    def chunk(self, index: int, hidden: Tensor, cache: DecoderCache, row_ids: Tensor, t: int,
              waiting: Tensor) -> tuple[Tensor, int]:
        """Layer ``index`` for cache position t plus the caption positions waiting at this layer, as one
        causal chunk (each at its own rotary position). hidden [r, width]; row_ids [r]; waiting
        [r, t - cache.offset] bool. Returns (hidden of position t [r, width], positions caught up)."""
        block = self.blocks[index]
        layout = chunk_layout(cache, hidden, row_ids, t, waiting)
        chunk = layout.chunk  # [r, c+1, width]
        cos, sin = self.rotary(layout.positions, chunk)  # [r, c+1, hd]
        query, key, value = self._qkv(block, chunk, cos, sin)
        keys, values = layout.write_and_read(index, key.transpose(1, 2)[layout.write], value.transpose(1, 2)[layout.write])
        chunk = self._finish(block, chunk, query, keys, values, layout.mask)
        return layout.finish(index, chunk), layout.caught_up

    def project_kv(self, index: int, hidden: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """K/V of layer ``index`` at cache position t (an int, or [n]: one per row) from hidden
        [n, width] (norm, k/v projections, RoPE at t; no attention, no MLP): 2 x [n, kv_heads, hd]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        block = self.blocks[index]
        attention = block.self_attn
        normed = block.input_layernorm(hidden)
        n = hidden.shape[0]
        key = attention.k_proj(normed).view(n, self.num_kv_heads, 1, self.head_dim)
        value = attention.v_proj(normed).view(n, self.num_kv_heads, self.head_dim)
        positions = torch.tensor([t], device=hidden.device) if isinstance(t, int) else t
        cos, sin = self.rotary(positions, hidden)  # [1 or n, hd]
        _, key = apply_rotary_pos_emb(key, key, cos[:, None], sin[:, None])  # [n, kv_heads, 1, hd]
        return key[:, :, 0], value

    def architecture(self) -> dict:
        """The LlamaConfig keys that rebuild this decoder's shape (saved with a trained captioner)."""
        return {k: v for k, v in self.decoder.config.to_dict().items() if k in ARCHITECTURE_KEYS}
