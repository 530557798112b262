"""ALBERT: one set of layer weights (a layer group) applied ``num_hidden_layers`` times.

Each application is one layer call for mmexit: exits can follow any application and
``model.exits`` counts applications (``all`` = 12 exits on albert-base-v2, one shared group).
The embeddings are ``embedding_size`` wide; the encoder's ``embedding_hidden_mapping_in``
projection to ``hidden_size`` is part of ``embed``. With several groups (``num_hidden_groups``)
application ``i`` uses group ``int(i / (layers / groups))``, as transformers does.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.encoders import EncoderAdapter, LayerContext


class AlbertAdapter(EncoderAdapter):
    """``embeddings`` -> ``encoder.embedding_hidden_mapping_in`` -> the shared group, once per layer call."""

    families = ("albert",)

    @property
    def layers(self) -> list[nn.Module]:
        """The layer group of each application (the same module repeated: weights are shared)."""
        return [self.group(index) for index in range(self.backbone.config.num_hidden_layers)]

    def group(self, index: int) -> nn.Module:
        """The layer group that application ``index`` (0-based) runs."""
        config = self.backbone.config
        position = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        return self.backbone.encoder.albert_layer_groups[position]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """[batch, seq] -> [batch, seq, hidden] (embeddings [.., embedding_size], then the projection)."""
        return self.backbone.encoder.embedding_hidden_mapping_in(super().embed(input_ids, token_type_ids))

    def call_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        return self.group(index)(hidden, context["mask"])

    def truncate(self, num_layers: int) -> None:
        """Run the shared group ``num_layers`` times instead (one group only: with several, fewer
        applications would also move the boundaries between groups)."""
        self.check_depth(num_layers)
        if self.backbone.config.num_hidden_groups != 1:
            raise ModelLoadError(
                "model.num_layers: truncating an ALBERT with several layer groups (num_hidden_groups > 1) "
                "would change which group each layer runs; not supported"
            )
        self.backbone.config.num_hidden_layers = num_layers
