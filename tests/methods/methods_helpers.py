"""Tiny models and inputs for the exit-method tests (random weights, CPU, seconds).

A plain module (not conftest.py) so that its helper names do not clash with tests/conftest.py."""

from __future__ import annotations

import torch

from mmexit.models.encoder import MultiExitEncoder
from mmexit.models.loading import tiny_backbone


def tiny_model(num_labels: int = 3, exits="all", seed: int = 0, family: str = "tiny:bert", depth: int | None = None):
    """A random tiny encoder (4 layers, hidden 32) with exits; ``depth`` truncates the backbone."""
    torch.manual_seed(seed)
    backbone = tiny_backbone(family)
    if depth is not None:
        backbone.encoder.layer = backbone.encoder.layer[:depth]
        backbone.config.num_hidden_layers = depth
    model = MultiExitEncoder(backbone, num_labels, exits)
    # larger weights than the default init so that rows differ and confidences spread over [1/C, 1]
    with torch.no_grad():
        for parameter in backbone.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
        for head in model.heads:
            head.classifier.weight.mul_(6.0)
    return model.eval()


def random_batch(batch: int = 32, seq: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] starting with [CLS] and right-padded at random lengths, and the mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=generator)
    ids[:, 0] = 101
    lengths = torch.randint(4, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids * mask
    return ids, mask
