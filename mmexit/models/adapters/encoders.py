"""Encoder adapters: the embedding step, the layer list and one layer call of an HF encoder.

mmexit never copies modeling code: it calls the backbone's own embedding module and layer modules
one at a time, so exits can sit between layers and rows can leave the batch between them. What
differs between families (MPNet's relative position bias, which BERT lacks) lives here.

Supported: BERT-like encoders (BERT, RoBERTa, ELECTRA, XLM-R: ``embeddings`` + ``encoder.layer``)
and MPNet. DeBERTa's layers need the relative embeddings its encoder prepares per call; it is not
supported yet and fails with a clear message.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from mmexit.errors import ModelLoadError

LayerContext = dict[str, Tensor]


class EncoderAdapter:
    """BERT-like encoders: ``backbone.embeddings`` then ``backbone.encoder.layer[i](h, mask)``."""

    families = ("bert", "roberta", "electra", "xlm-roberta", "camembert")

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """[batch, seq] token ids -> [batch, seq, hidden] embeddings."""
        if token_type_ids is None:
            return self.backbone.embeddings(input_ids=input_ids)
        return self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        """Per-row tensors every layer call needs (first dim = batch, so rows can be dropped)."""
        mask = create_bidirectional_mask(
            config=self.backbone.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            allow_is_bidirectional_skip=False,
        )
        return {"mask": mask}

    def call_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        """[batch, seq, hidden] -> [batch, seq, hidden] through layer ``index`` (0-based)."""
        output = self.layers[index](hidden, context["mask"])
        return output[0] if isinstance(output, tuple) else output


class MPNetAdapter(EncoderAdapter):
    """MPNet: the encoder's relative position bias is computed once and passed to every layer."""

    families = ("mpnet",)

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        return self.backbone.embeddings(input_ids=input_ids)

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        context = super().context(hidden, attention_mask)
        # [batch, heads, seq, seq]
        context["position_bias"] = self.backbone.encoder.compute_position_bias(hidden)
        return context

    def call_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        output = self.layers[index](hidden, context["mask"], context["position_bias"])
        return output[0] if isinstance(output, tuple) else output
