"""Per-family adapters: what mmexit needs to call a Hugging Face model one layer at a time.

- ``encoders``: BERT-like encoders and MPNet (text classification);
- ``gpt2``: the GPT-2 decoder with cross-attention (captioning), its cached one-token layer step,
  deferred catch-up chunks and K/V projection;
- ``vision``: image encoders (timm, Hugging Face ViT).
A new family is one more adapter; nothing else in mmexit reads a model's internals.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.encoders import EncoderAdapter, LayerContext, MPNetAdapter

ADAPTERS: dict[str, type[EncoderAdapter]] = {
    family: adapter for adapter in (EncoderAdapter, MPNetAdapter) for family in adapter.families
}


def adapter_for(backbone: nn.Module) -> EncoderAdapter:
    """The adapter of the backbone's ``config.model_type``, or a clear error."""
    model_type = getattr(backbone.config, "model_type", "?")
    if model_type not in ADAPTERS:
        raise ModelLoadError(
            f"model.backbone: model type '{model_type}' has no mmexit adapter; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](backbone)


def subset_context(context: LayerContext, keep: Tensor) -> LayerContext:
    """Keep rows ``keep`` (bool [batch] or indices) of every context tensor."""
    return {key: value[keep] for key, value in context.items()}

