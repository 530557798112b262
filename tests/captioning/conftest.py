"""Tiny random captioners built in code (no downloads) shared by the captioning tests."""

from __future__ import annotations

import pytest
import torch

from mmexit_testing import CAPTION_BOS as BOS, CAPTION_EOS as EOS, CAPTION_PAD as PAD
from mmexit.models.captioner import build_captioner


def tiny_spec(n_layer: int = 4, exits="all", exit_head: str = "shared", vocab: int = 30) -> dict:
    return {
        "encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                    "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "decoder": {"config": {"n_layer": n_layer, "n_embd": 32, "n_head": 2, "n_positions": 24,
                               "initializer_range": 0.3}},
        "vocab_size": vocab, "special_ids": {"bos": BOS, "eos": EOS, "pad": PAD},
        "exits": exits, "exit_head": exit_head,
    }


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_captioner():
    torch.manual_seed(0)
    return build_captioner(tiny_spec()).eval()


@pytest.fixture(scope="session")
def tiny_features(tiny_captioner):
    torch.manual_seed(1)
    with torch.inference_mode():
        return tiny_captioner.encode(torch.randn(6, 3, 32, 32))


@pytest.fixture(scope="session")
def make_spec():
    return tiny_spec
