"""The GPT-2 decoder (with cross-attention to image features) behind mmexit's decoder adapter.

``GPT2DecoderAdapter`` implements ``mmexit.models.adapters.decoder_protocol.DecoderAdapter`` (the
interface the captioner and the decoding engine call, with shapes) for GPT-2 blocks with
cross-attention: the image's cross-attention K/V are the cache's per-layer constants
(``init_cache_layer``) and there is no prefix (``prefix_length`` is 0). The block maths calls the block's own modules
(``ln_1``, ``attn.c_attn``, ``crossattention``, ``mlp``) with their own weights; nothing of
transformers is copied. The cached paths apply a ``Conv1D`` as one ``addmm`` and the tanh-GELU as
one fused kernel (``dense``, ``mlp``): the same maths as the modules, without their call overhead.
``mmexit.models.adapters.llama`` is the same seam for LLaMA-family decoders.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.decoder_protocol import DecoderAdapter
from mmexit.models.kv_cache import DecoderCache, chunk_layout, span_mask
from mmexit.models.slot_cache import SlotCache


def build_gpt2_decoder(vocab_size: int, pretrained: str | None = None, special_ids: dict | None = None,
                       **config: Any) -> nn.Module:
    """GPT2LMHeadModel with cross-attention: random init from a GPT2Config, or hub/local weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if pretrained:
        try:
            decoder = GPT2LMHeadModel.from_pretrained(pretrained, add_cross_attention=True,
                                                      attn_implementation="sdpa")
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"GPT-2 decoder {pretrained!r} cannot be loaded (offline?): {message}") from None
        if decoder.config.vocab_size != vocab_size:
            decoder.resize_token_embeddings(vocab_size)
        return decoder
    ids = {f"{key}_token_id": value for key, value in (special_ids or {}).items()}
    gpt2_config = GPT2Config(vocab_size=vocab_size, add_cross_attention=True, attn_implementation="sdpa",
                             **ids, **config)
    return GPT2LMHeadModel(gpt2_config)


#: GPT-2 activations that are the tanh approximation of GELU (``F.gelu(approximate="tanh")``)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@functools.cache
def _conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def dense(module: nn.Module, x: Tensor) -> Tensor:
    """A transformers ``Conv1D`` (x @ weight + bias) as one ``addmm``: x [..., in] -> [..., out].

    The cached paths call it per layer and per decoding step, where the module call's own overhead
    is a visible share of a small call. Anything else (e.g. a LoRA wrapper not yet merged) is called.
    """
    if not isinstance(module, _conv1d_class()):
        return module(x)
    return torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), module.weight).view(*x.shape[:-1], module.nf)


class GPT2DecoderAdapter(DecoderAdapter):
    """GPT-2 blocks: pre-norm self-attention (fused ``c_attn``), cross-attention, MLP."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        config = decoder.config
        self.width = config.n_embd
        self.num_heads = self.num_kv_heads = config.n_head
        self.head_dim = self.width // self.num_heads
        self.vocab_size = config.vocab_size
        self.layer_norm_epsilon = config.layer_norm_epsilon
        self.tanh_gelu = getattr(config, "activation_function", "gelu_new") in TANH_GELU

    def mlp(self, block: nn.Module, x: Tensor) -> Tensor:
        """The block's MLP on x [..., width]: c_fc, GELU, c_proj (one fused GELU kernel when the
        activation is the tanh approximation and the model is in eval mode; else the block's own)."""
        mlp = block.mlp
        if not self.tanh_gelu or mlp.training:
            return mlp(x)
        return dense(mlp.c_proj, F.gelu(dense(mlp.c_fc, x), approximate="tanh"))

    # ------------------------------------------------------------------ pieces both paths read
    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.transformer.h

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token + position embeddings; tokens [...], positions broadcastable -> [..., width]."""
        transformer = self.decoder.transformer
        return transformer.wte(tokens) + transformer.wpe(positions)

    def embed_dropout(self, hidden: Tensor) -> Tensor:
        return self.decoder.transformer.drop(hidden)

    @property
    def norm_module(self) -> nn.Module:
        """The final norm (``ln_f``); a per-exit ``norm`` head starts as a copy of it."""
        return self.decoder.transformer.ln_f

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.decoder.transformer.ln_f(hidden)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.decoder.lm_head(hidden)

    def layer(self, index: int, hidden: Tensor, features: Tensor) -> Tensor:
        """Teacher-forced block ``index``: hidden [B, T, width] -> [B, T, width] (causal, sdpa, no mask)."""
        return self.blocks[index](hidden, None, None, features)

    # ---------------------------------------------------------------- cached one-position maths
    def init_cache_layer(self, index: int, features: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention K/V of layer ``index`` from features [rows, patches, width]: 2 x [rows, heads, patches, hd]."""
        key, value = dense(self.blocks[index].crossattention.c_attn, features).split(self.width, dim=-1)
        return self._heads(key), self._heads(value)

    def _heads(self, tensor: Tensor) -> Tensor:
        rows, patches, _ = tensor.shape
        return tensor.view(rows, patches, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def prefix_length(self, features: Tensor) -> int:
        """GPT-2 reads the image by cross-attention: no cache positions before the caption."""
        return 0

    def prefill(self, cache: DecoderCache, features: Tensor) -> None:
        """Nothing to write (``prefix_length`` is 0)."""

    def step(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], t: int) -> Tensor:
        """Layer ``index`` for one new position t; hidden [r, width]; rows: cache rows of hidden (None = all)."""
        return self.span(index, hidden[:, None], cache, rows, t)[:, 0]

    def span(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], start: int) -> Tensor:
        """Layer ``index`` for new positions start..start+n-1 (causal); hidden [r, n, width] -> [r, n, width]."""
        block = self.blocks[index]
        r, n, width = hidden.shape
        attention = block.attn
        query, key, value = dense(attention.c_attn, block.ln_1(hidden)).split(width, dim=-1)
        keys, values = cache.write_span_and_read(index, rows, start, self._heads(key), self._heads(value))
        out = F.scaled_dot_product_attention(self._heads(query), keys, values,
                                             attn_mask=span_mask(start, n, hidden.device), scale=attention.scaling)
        return self._after_self_attention(index, hidden, out, cache, rows)

    def step_rows(self, index: int, hidden: Tensor, cache: SlotCache, rows: Tensor, positions: Tensor,
                  length: Optional[int] = None) -> Tensor:
        """Layer ``index`` for one new position per row, each at its own cache position (the continuous
        decoder's ``SlotCache``).

        hidden [r, width]; rows [r] cache rows; positions [r] cache positions (K/V written there, the
        query reads positions 0..own position); length: max(positions) + 1 if known. -> [r, width].
        Tokens the cache folded into this layer's call (``SlotCache.take_folded``: state propagation of
        tokens that skipped it) go through the same ``ln_1`` / ``c_attn`` call; their K/V are written
        first. (One position per row: [r, 1, width] and [r, heads, 1, head_dim] are the same memory,
        so the query, K/V and the head reshapes after attention are views.)
        """
        block = self.blocks[index]
        folded = cache.take_folded(index)
        r, width, heads, head_dim = hidden.shape[0], self.width, self.num_heads, self.head_dim
        hidden = hidden[:, None]  # [r, 1, width]
        attention = block.attn
        if folded is None:
            qkv = dense(attention.c_attn, block.ln_1(hidden))
        else:
            qkv = dense(attention.c_attn, block.ln_1(torch.cat([hidden, folded.hidden[:, None]])))  # [r + m, 1, 3 width]
            cache.write_folded(index, folded, qkv[r:, 0, width:].view(-1, 2, heads, head_dim))
            qkv = qkv[:r]
        keys, values, mask = cache.write_kv_rows_and_read(index, rows, positions,  # K and V in one write
                                                          qkv[:, 0, width:].view(r, 2, heads, head_dim), length)
        out = F.scaled_dot_product_attention(qkv[:, :, :width].view(r, heads, 1, head_dim), keys, values,
                                             attn_mask=mask, scale=attention.scaling)
        return self._after_self_attention(index, hidden, out, cache, rows)[:, 0]  # n = 1: reshapes are views

    step_rows.takes_folded = True  # it projects the K/V of the rows a SlotCache folds into the call

    def _after_self_attention(self, index: int, hidden: Tensor, out: Tensor, cache: DecoderCache,
                              rows: Optional[Tensor]) -> Tensor:
        """Layer ``index`` after its self-attention: out [r, heads, n, hd] -> c_proj + residual,
        cross-attention, MLP; hidden [r, n, width] (the layer's input) -> [r, n, width]."""
        block = self.blocks[index]
        r, n, width = hidden.shape
        hidden = hidden + dense(block.attn.c_proj, out.transpose(1, 2).reshape(r, n, width))
        cross_keys, cross_values = cache.constant(index, rows)
        cross = block.crossattention
        query = self._heads(dense(cross.q_attn, block.ln_cross_attn(hidden)))
        out = F.scaled_dot_product_attention(query, cross_keys, cross_values, scale=cross.scaling)
        hidden = hidden + dense(cross.c_proj, out.transpose(1, 2).reshape(r, n, width))
        return hidden + self.mlp(block, block.ln_2(hidden))

    def chunk(self, index: int, hidden: Tensor, cache: DecoderCache, row_ids: Tensor, t: int,
              waiting: Tensor) -> tuple[Tensor, int]:
        """Layer ``index`` for position t plus the positions waiting at this layer, as one causal chunk.

        hidden [r, width] (position t); row_ids [r] cache rows; waiting [r, t] bool. Their K/V at this
        layer are written, their hidden states and depth advance by one layer.
        Returns (hidden of position t [r, width], positions caught up).
        """
        block = self.blocks[index]
        layout = chunk_layout(cache, hidden, row_ids, t, waiting)
        chunk, r, c = layout.chunk, hidden.shape[0], layout.size
        width, heads, head_dim = self.width, self.num_heads, self.head_dim
        attention = block.attn
        query, key, value = dense(attention.c_attn, block.ln_1(chunk)).split(width, dim=-1)  # [r, c+1, width]
        keys, values = layout.write_and_read(index, key[layout.write].view(-1, heads, head_dim),
                                             value[layout.write].view(-1, heads, head_dim))
        query = query.view(r, c + 1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=layout.mask, scale=attention.scaling)
        chunk = chunk + dense(attention.c_proj, out.transpose(1, 2).reshape(r, c + 1, width))
        cross = block.crossattention
        cross_keys, cross_values = cache.constant(index, row_ids)
        query = dense(cross.q_attn, block.ln_cross_attn(chunk)).view(r, c + 1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, cross_keys, cross_values, scale=cross.scaling)
        chunk = chunk + dense(cross.c_proj, out.transpose(1, 2).reshape(r, c + 1, width))
        chunk = chunk + self.mlp(block, block.ln_2(chunk))
        return layout.finish(index, chunk), layout.caught_up

    def project_kv(self, index: int, hidden: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """K/V of layer ``index`` from hidden [n, width] (no attention, no MLP): 2 x [n, heads, hd].
        GPT-2's K/V do not depend on the position t (an int or [n]; learned absolute embeddings)."""
        block = self.blocks[index]
        projection = block.attn.c_attn  # Conv1D: x @ weight + bias, weight [width, 3 * width]
        width = self.width
        if hasattr(projection, "base_layer"):  # wrapped by LoRA (peft, not merged): its weight is the base's only
            key_value = projection(block.ln_1(hidden))[:, width:]
        else:
            key_value = torch.addmm(projection.bias[width:], block.ln_1(hidden), projection.weight[:, width:])
        key, value = key_value.split(width, dim=-1)
        n = hidden.shape[0]
        return key.view(n, self.num_heads, self.head_dim), value.view(n, self.num_heads, self.head_dim)

    def architecture(self) -> dict:
        """The GPT2Config keys that rebuild this decoder's shape (saved with a trained captioner)."""
        return {k: v for k, v in self.decoder.config.to_dict().items()
                if k in ("n_layer", "n_embd", "n_head", "n_positions", "n_inner", "layer_norm_epsilon",
                         "activation_function")}
