"""Encoder adapters: the embedding step, the layer list and one layer call of an HF encoder.

mmexit never copies modeling code: it calls the backbone's own embedding module and layer modules
one at a time, so exits can sit between layers and rows can leave the batch between them. What
differs between families (MPNet's relative position bias, which BERT lacks) lives here.

Here: BERT-like encoders (BERT, RoBERTa, ELECTRA, XLM-R, CamemBERT: ``embeddings`` +
``encoder.layer``) and MPNet. Beside this file, one per family: ``albert`` (one shared layer group
applied ``num_hidden_layers`` times), ``deberta`` (DeBERTa v1 and v2/v3: relative embeddings and
positions prepared once per call), ``distilbert`` and ``modernbert`` (global/local attention,
rotary positions, padded path).

The interface every encoder adapter gives ``MultiExitEncoder``:
- ``layers``: one entry per layer *call* (ALBERT repeats its shared group), ``len`` = the depth;
- ``embed(input_ids, token_type_ids)`` -> [batch, seq, hidden];
- ``context(hidden, attention_mask)`` -> what every layer call needs: per-row tensors (first dim =
  batch, so rows that exit can be dropped) and ``shared_*`` tensors without a batch dimension;
- ``call_layer(index, hidden, context)`` -> [batch, seq, hidden];
- ``take_final_norm()``: a norm the backbone applies after its last layer (pre-LN families), moved
  into every exit head; ``truncate(num_layers)``: keep the first layers.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from mmexit.errors import ModelLoadError

LayerContext = dict[str, Tensor]
#: context keys with this prefix hold tensors shared by every row (no batch dimension)
SHARED_PREFIX = "shared_"


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

    def take_final_norm(self) -> nn.Module | None:
        """The norm applied after the last layer, removed from the backbone (None: there is none)."""
        return None

    def truncate(self, num_layers: int) -> None:
        """Keep the first ``num_layers`` layers (static truncation / Multi-Model members)."""
        self.check_depth(num_layers)
        self.backbone.encoder.layer = nn.ModuleList(list(self.layers)[:num_layers])
        self.backbone.config.num_hidden_layers = num_layers

    def check_depth(self, num_layers: int) -> None:
        if not 1 <= num_layers <= len(self.layers):
            raise ModelLoadError(
                f"model.num_layers: {num_layers} is not between 1 and the backbone's {len(self.layers)} layers"
            )


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
