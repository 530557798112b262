"""DeBERTa (v1, ``deberta``) and DeBERTa-v2/v3 (``deberta-v2``): disentangled attention.

transformers' encoder prepares three things once per call and hands them to every layer; mmexit
asks the encoder for the same three (its own methods) in ``context``:
- the 0/1 attention mask [batch, 1, seq, seq] (``get_attention_mask``; per row);
- the relative positions [1, seq, seq] (``get_rel_pos``: log buckets on v3; shared by all rows);
- the relative embeddings [2 * span, hidden] (``get_rel_embedding``, layer-normed on v3; shared).
Rows that exit drop their mask rows; the two ``shared_*`` tensors have no batch dimension.
DeBERTa-v2's optional convolution (``conv_kernel_size`` > 0, e.g. v2-xlarge) runs after layer 1
as in transformers. The embeddings' output is multiplied by the padding mask in transformers;
mmexit does that on entry to layer 1, where the mask is known (same values).
The enhanced mask decoder (``z_steps`` > 1) is a pretraining head that re-runs the last layer;
transformers leaves it off (``z_steps = 0``) and so does mmexit (refused if set).
"""

from __future__ import annotations

from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.encoders import EncoderAdapter, LayerContext


class DebertaAdapter(EncoderAdapter):
    """``embeddings`` then ``encoder.layer[i](h, mask, relative_pos=..., rel_embeddings=...)``."""

    families = ("deberta", "deberta-v2")

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        if getattr(backbone, "z_steps", 0) > 1:
            raise ModelLoadError(
                "model.backbone: DeBERTa with z_steps > 1 (the enhanced mask decoder's repeated last layer) "
                "is not supported; set z_steps = 0 as transformers does"
            )

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """[batch, seq] -> [batch, seq, hidden] (before the padding mask, applied in layer 1's call)."""
        return self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        encoder = self.backbone.encoder
        context = {
            "mask": encoder.get_attention_mask(attention_mask),  # [batch, 1, seq, seq] 0/1
            "input_mask": attention_mask,  # [batch, seq]
        }
        relative_pos = encoder.get_rel_pos(hidden)  # [1, seq, seq] or None
        if relative_pos is not None:
            context["shared_relative_pos"] = relative_pos
        rel_embeddings = encoder.get_rel_embedding()  # [2 * span, hidden] or None
        if rel_embeddings is not None:
            context["shared_rel_embeddings"] = rel_embeddings
        return context

    def call_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        input_mask = context["input_mask"]
        if index == 0:  # transformers masks the embeddings' output
            hidden = hidden * input_mask.unsqueeze(-1).to(hidden.dtype)
        output, _ = self.layers[index](
            hidden,
            context["mask"],
            relative_pos=context.get("shared_relative_pos"),
            rel_embeddings=context.get("shared_rel_embeddings"),
        )
        conv = getattr(self.backbone.encoder, "conv", None)
        if index == 0 and conv is not None:
            output = conv(hidden, output, input_mask)
        return output
