"""Per-family adapters: what mmexit needs to call a Hugging Face model one layer at a time.

- ``encoders``: BERT-like encoders and MPNet (text classification), with ``albert``, ``deberta``
  (DeBERTa v1 and v2/v3), ``distilbert`` and ``modernbert`` beside it;
- decoders (captioning, text generation): ``decoder_protocol`` (``DecoderAdapter``, the typed
  interface the decoding engine calls), ``decoders`` (THE decoder family registry:
  ``DECODER_FAMILIES``), ``gpt2`` (cross-attention) and ``llama`` (an image / prompt prefix);
- ``vision``: image encoders (timm, Hugging Face ViT).
A new family is one more adapter (a decoder: plus one ``DecoderFamily`` entry in ``decoders``);
nothing else in mmexit reads a model's internals.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters.albert import AlbertAdapter
from mmexit.models.adapters.deberta import DebertaAdapter
from mmexit.models.adapters.distilbert import DistilBertAdapter
from mmexit.models.adapters.encoders import SHARED_PREFIX, EncoderAdapter, LayerContext, MPNetAdapter
from mmexit.models.adapters.modernbert import ModernBertAdapter

ENCODER_ADAPTERS = (EncoderAdapter, MPNetAdapter, AlbertAdapter, DebertaAdapter, DistilBertAdapter, ModernBertAdapter)
ADAPTERS: dict[str, type[EncoderAdapter]] = {
    family: adapter for adapter in ENCODER_ADAPTERS for family in adapter.families
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
    """Keep rows ``keep`` (bool [batch] or indices) of every per-row context tensor; ``shared_*``
    entries (no batch dimension: DeBERTa's relative embeddings, rotary tables) are kept whole."""
    return {key: value if key.startswith(SHARED_PREFIX) else value[keep] for key, value in context.items()}

