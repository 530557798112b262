"""The decoder adapter interface: what mmexit calls on a decoder to run it one layer at a time.

A decoder adapter gives the captioner (``mmexit.models.captioner``) and the decoding engine
(``mmexit.inference``: stepper, search, continuous decoder, speculative decoding, text generation)
everything they need to run a Hugging Face causal LM one layer and one new position at a time
against a KV cache that mmexit manages (``mmexit.models.kv_cache``). Nothing else in mmexit reads
a decoder's internals.

Shapes: ``r`` rows (sequences or beams), ``n`` new positions, ``P`` image (prompt) prefix positions,
``width`` the hidden size. Positions given to the cached calls are *cache* positions: caption
position t lives at cache position ``prefix_length(features) + t``.

An adapter may mark its ``step_rows`` with ``step_rows.takes_folded = True``: it then projects the
K/V of the tokens a ``SlotCache`` folds into the call itself (``SlotCache.take_folded``); without
the mark the continuous decoder projects them by ``project_kv`` just before the call.

A new family is one adapter class that subclasses ``DecoderAdapter`` (and so declares that it
implements every member) plus one ``DecoderFamily`` entry in ``mmexit.models.adapters.decoders``.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from mmexit.models.kv_cache import DecoderCache
from mmexit.models.slot_cache import SlotCache


@runtime_checkable
class DecoderAdapter(Protocol):
    """One decoder family's layer-by-layer maths over the model's own modules and weights."""

    #: the wrapped causal LM; ``decoder.lm_head`` is its ``nn.Linear`` LM head [vocab, width] (caption
    #: vocabulary heads read its rows directly, int8 quantization keeps it float)
    decoder: nn.Module
    #: hidden size
    width: int
    #: query heads of self-attention
    num_heads: int
    #: key/value heads (grouped-query attention: a divisor of ``num_heads``); the cache's K/V shape
    num_kv_heads: int
    #: size of one head; the cache's K/V are [rows, num_kv_heads, positions, head_dim]
    head_dim: int
    #: rows of the LM head
    vocab_size: int

    def __init__(self, decoder: nn.Module) -> None: ...

    @property
    def num_layers(self) -> int:
        """Decoder layers (blocks)."""
        ...

    @property
    def norm_module(self) -> nn.Module:
        """The final norm module; a per-exit ``norm`` head starts as a copy of it."""
        ...

    # ------------------------------------------------------------------ teacher-forced pieces
    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Input embeddings: tokens [...] (ids), positions broadcastable to them -> [..., width]."""
        ...

    def embed_dropout(self, hidden: Tensor) -> Tensor:
        """The model's dropout after the embeddings (identity where it has none): [..., width]."""
        ...

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The final norm: [..., width] -> [..., width]."""
        ...

    def lm_head(self, hidden: Tensor) -> Tensor:
        """The LM head: [..., width] -> logits [..., vocab_size]."""
        ...

    def layer(self, index: int, hidden: Tensor, features: Tensor) -> Tensor:
        """Teacher-forced layer ``index`` (0-based, causal, whole sequences): hidden [B, T, width] ->
        [B, T, width] (T includes the prefix where there is one); features [B, P, width] the image."""
        ...

    # ------------------------------------------------------------------ cached pieces
    def init_cache_layer(self, index: int, features: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """Constants of layer ``index`` for features [r, P, width], e.g. cross-attention K/V
        2 x [r, heads, P, head_dim]; None when the family has none."""
        ...

    def prefix_length(self, features: Tensor) -> int:
        """Cache positions the image prefix takes (0 for a cross-attention decoder, P for a prefix one)."""
        ...

    def prefill(self, cache: DecoderCache, features: Tensor) -> None:
        """Write the prefix's K/V (positions 0..P-1 of every layer) from features [r, P, width]."""
        ...

    def step(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], t: int) -> Tensor:
        """Layer ``index`` for one new cache position t: hidden [r, width] -> [r, width]; rows [r]:
        the cache rows of ``hidden`` (None: all of them). Writes the position's K/V."""
        ...

    def step_rows(self, index: int, hidden: Tensor, cache: SlotCache, rows: Tensor, positions: Tensor,
                  length: Optional[int] = None) -> Tensor:
        """Layer ``index`` for one new position per row, each at its own cache position (the
        continuous decoder): hidden [r, width] -> [r, width]; rows [r] cache rows; positions [r]
        cache positions (K/V written there, the query reads 0..own position); length: max(positions)
        + 1 if known."""
        ...

    def span(self, index: int, hidden: Tensor, cache: DecoderCache, rows: Optional[Tensor], start: int) -> Tensor:
        """Layer ``index`` for new positions start..start+n-1 (causal; speculative verification,
        prefill): hidden [r, n, width] -> [r, n, width]."""
        ...

    def chunk(self, index: int, hidden: Tensor, cache: DecoderCache, row_ids: Tensor, t: int,
              waiting: Tensor) -> tuple[Tensor, int]:
        """Layer ``index`` for position t plus the positions waiting at this layer as one causal chunk
        (the deferred policy): hidden [r, width]; row_ids [r] cache rows; waiting [r, t - offset] bool.
        Returns (hidden of position t [r, width], positions caught up)."""
        ...

    def project_kv(self, index: int, hidden: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """K/V of layer ``index`` at cache position t (an int, or [n]: one per row) from hidden
        [n, width], without attention or MLP (state propagation): 2 x [n, num_kv_heads, head_dim]."""
        ...

    def architecture(self) -> dict:
        """The HF config keys that rebuild this decoder's shape (saved with a trained captioner)."""
        ...
