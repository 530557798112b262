"""Helpers shared by the top-level tests: tiny random multi-exit models and where ../shared lives.

(Not a conftest: tests/captioning has its own conftest.py, and two modules named conftest clash.)
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
def tiny_model(family: str = "bert", num_labels: int = 3, exits="all", seed: int = 0):
    """A 4-layer random encoder (hidden 32) with exits, in eval mode."""
    from mmexit.models.encoder import MultiExitEncoder
    from mmexit.models.loading import tiny_backbone

    torch.manual_seed(seed)
    return MultiExitEncoder(tiny_backbone(f"tiny:{family}"), num_labels, exits).eval()


def random_batch(batch: int = 32, seq: int = 16, seed: int = 1):
    """Random token ids with ragged padding: ([batch, seq], [batch, seq])."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (batch, seq), generator=generator)
    lengths = torch.randint(3, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask
