"""ModernBERT: pre-LN layers alternating global and local (sliding-window) attention, rotary positions.

``context`` builds what transformers' ``ModernBertModel.forward`` builds once per call: one mask
per attention type (full and sliding window, [batch, 1, seq, seq], per row) and the rotary
cos/sin tables per attention type ([1, seq, head_dim], shared; global and local layers use
different bases). Each layer picks its mask and table by ``layer.attention_type``.

The padded path: rows are right-padded and masked, which is transformers 5's own path for eager
and SDPA attention. The unpadded (varlen, flash-attention) path is not used; padding is the
documented fallback, exact but paying for padded tokens (the serving engine groups rows by length).

The final LayerNorm (``final_norm``, after the last layer) is taken out of the backbone and
copied into every exit head, so each exit reads a normalised state, as the last layer does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from mmexit.models.adapters.encoders import EncoderAdapter, LayerContext

MASKS = {"full_attention": create_bidirectional_mask, "sliding_attention": create_bidirectional_sliding_window_mask}


class ModernBertAdapter(EncoderAdapter):
    """``embeddings`` then ``layers[i](h, attention_mask=mask[type], position_embeddings=rope[type])``."""

    families = ("modernbert",)

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """[batch, seq] -> [batch, seq, hidden]; no positions (rotary) and no token types."""
        return self.backbone.embeddings(input_ids=input_ids)

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        config = self.backbone.config
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, seq]
        context: LayerContext = {}
        for kind in sorted(set(config.layer_types)):
            context[f"mask_{kind}"] = MASKS[kind](
                config=config, inputs_embeds=hidden, attention_mask=attention_mask, allow_is_bidirectional_skip=False
            )
            cos, sin = self.backbone.rotary_emb(hidden, positions, kind)
            context[f"shared_cos_{kind}"], context[f"shared_sin_{kind}"] = cos, sin
        return context

    def call_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        layer = self.layers[index]
        kind = layer.attention_type
        rope = (context[f"shared_cos_{kind}"], context[f"shared_sin_{kind}"])
        return layer(hidden, attention_mask=context[f"mask_{kind}"], position_embeddings=rope)

    def take_final_norm(self) -> nn.Module | None:
        norm = self.backbone.final_norm
        if isinstance(norm, nn.Identity):
            return None
        self.backbone.final_norm = nn.Identity()
        return norm

    def truncate(self, num_layers: int) -> None:
        self.check_depth(num_layers)
        self.backbone.layers = nn.ModuleList(list(self.layers)[:num_layers])
        self.backbone.config.layer_types = list(self.backbone.config.layer_types)[:num_layers]
        self.backbone.config.num_hidden_layers = num_layers
