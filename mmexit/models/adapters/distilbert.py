"""DistilBERT: ``embeddings`` (words + positions, no token types) then ``transformer.layer``."""

from __future__ import annotations

from torch import Tensor, nn

from mmexit.models.adapters.encoders import EncoderAdapter


class DistilBertAdapter(EncoderAdapter):
    """Post-LN layers like BERT's; only the module names and the embeddings differ."""

    families = ("distilbert",)

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.transformer.layer

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """[batch, seq] -> [batch, seq, hidden]; DistilBERT has no token types (segment ids are ignored)."""
        return self.backbone.embeddings(input_ids)

    def truncate(self, num_layers: int) -> None:
        self.check_depth(num_layers)
        self.backbone.transformer.layer = nn.ModuleList(list(self.layers)[:num_layers])
        self.backbone.transformer.n_layers = num_layers
        self.backbone.config.num_hidden_layers = num_layers  # config.n_layers (attribute map)
