"""Exit heads: (a norm,) pool the sequence, then a pooler (dense + tanh) and a classifier, one per exit."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ExitHead(nn.Module):
    """One exit: [batch, seq, hidden] -> pooled [batch, hidden] -> logits [batch, num_labels].

    Every exit owns its pooler and classifier (no sharing), so SWEET's gradient separation is
    complete; the official SWEET code shares BERT's pooler between exits, mmexit does not.
    ``norm``: for pre-LN backbones (ModernBERT), a copy of the backbone's final norm applied to the
    layer output first (identity otherwise).
    """

    def __init__(
        self, hidden_size: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.norm = norm if norm is not None else nn.Identity()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, seq, hidden], [batch, seq] -> [batch, hidden] (pooler output, after tanh)."""
        if self.pooling == "mean":
            hidden = self.norm(hidden)
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summary = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            summary = self.norm(hidden[:, 0])  # a per-token norm: only the first token's is needed
        return torch.tanh(self.dense(summary))

    def classify(self, pooled: Tensor) -> Tensor:
        """[batch, hidden] -> [batch, num_labels]."""
        return self.classifier(self.dropout(pooled))

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return self.classify(self.pool(hidden, attention_mask))
