"""Shapes and specs of the tiny random LLaMA decoders of tests/llama (imported by name, so the
module name must not collide with tests/captioning's ``conftest``)."""

from __future__ import annotations

BOS, PAD = 1, 0
EOS = 5  # a token the random models emit often: rows finish at different steps
VOCAB = 40
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.3,
         "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}


def llama_spec(exits="all", exit_head: str = "shared", **config) -> dict:
    return {
        "encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                    "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "decoder": {"type": "llama", "config": {**LLAMA, **config}},
        "vocab_size": VOCAB, "special_ids": {"bos": BOS, "eos": EOS, "pad": PAD},
        "exits": exits, "exit_head": exit_head,
    }
