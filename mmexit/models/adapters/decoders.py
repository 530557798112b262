"""THE decoder family registry: every table that switches on a decoder family derives from it.

A family is one ``DecoderFamily`` in ``DECODER_FAMILIES``: the recipe's ``model.decoder.type``
(its key), how to build the Hugging Face model, the adapter class (a
``mmexit.models.adapters.decoder_protocol.DecoderAdapter``), the Hugging Face ``model_type``s the
adapter drives and the modules LoRA may adapt. The captioner builds and wraps decoders through it,
``mmexit.models.lora`` reads its targets, and the captioning schema's allowed ``decoder.type``
values and docs are its keys and docs. Adding a family = one adapter file + one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mmexit.errors import ModelLoadError, RecipeError
from mmexit.models.adapters.decoder_protocol import DecoderAdapter
from mmexit.models.adapters.gpt2 import GPT2DecoderAdapter, build_gpt2_decoder
from mmexit.models.adapters.llama import LlamaDecoderAdapter, build_llama_decoder

#: builds a decoder: (vocab_size, pretrained: hub id / folder / packaged source or None, special_ids:
#: {bos, eos, pad} or None, **config: the family's HF config keys) -> the HF causal LM
DecoderBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class DecoderFamily:
    """One decoder family (a recipe's ``model.decoder.type``)."""

    name: str
    build: DecoderBuilder
    adapter: type[DecoderAdapter]
    #: the HF ``config.model_type`` values the adapter drives (a loaded decoder finds its adapter by them)
    model_types: tuple[str, ...]
    #: modules of a decoder layer LoRA may adapt (never the embeddings or the LM head: exit heads read
    #: ``lm_head.weight`` directly); empty: no LoRA for this family
    lora_targets: tuple[str, ...]
    #: the LoRA targets when the recipe gives none
    lora_default_targets: tuple[str, ...]
    #: the LoRA targets store their weight as [in, out] (transformers' ``Conv1D``; peft's ``fan_in_fan_out``)
    lora_fan_in_fan_out: bool
    #: one line for the recipe schema: how the decoder reads the image
    doc: str
    #: the HF config class whose keys ``model.decoder.config`` takes (for the schema's doc)
    config_doc: str


DECODER_FAMILIES: dict[str, DecoderFamily] = {family.name: family for family in (
    DecoderFamily(name="gpt2", build=build_gpt2_decoder, adapter=GPT2DecoderAdapter, model_types=("gpt2",),
                  lora_targets=("c_attn", "q_attn", "c_proj", "c_fc"), lora_default_targets=("c_attn",),
                  lora_fan_in_fan_out=True, doc="reads the image by cross-attention",
                  config_doc="GPT2Config (n_layer, n_embd, n_head, n_positions)"),
    DecoderFamily(name="llama", build=build_llama_decoder, adapter=LlamaDecoderAdapter, model_types=("llama",),
                  lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  lora_default_targets=("q_proj", "v_proj"), lora_fan_in_fan_out=False,
                  doc="the image tokens are a prefix", config_doc="LlamaConfig"),
)}
#: ``model.decoder.type`` when a recipe or spec gives none
DEFAULT_DECODER = "gpt2"


def decoder_docs(field: str) -> str:
    """One line over every family of one of its doc fields (``doc``, ``config_doc``): "gpt2: ...; llama: ..."."""
    return "; ".join(f"{name}: {getattr(family, field)}" for name, family in DECODER_FAMILIES.items())


def decoder_family(kind: str | None) -> DecoderFamily:
    """The family of a ``model.decoder.type`` (None: the default), or a one-line ``RecipeError``."""
    kind = kind or DEFAULT_DECODER
    if kind not in DECODER_FAMILIES:
        raise RecipeError(f"model.decoder.type: {kind!r} is not allowed; allowed: {', '.join(DECODER_FAMILIES)}")
    return DECODER_FAMILIES[kind]


def decoder_adapter(decoder: nn.Module) -> DecoderAdapter:
    """The adapter of a causal LM, chosen by its ``config.model_type``."""
    model_type = getattr(decoder.config, "model_type", "?")
    for family in DECODER_FAMILIES.values():
        if model_type in family.model_types:
            return family.adapter(decoder)
    supported = ", ".join(t for family in DECODER_FAMILIES.values() for t in family.model_types)
    raise ModelLoadError(f"captioner decoder: model type '{model_type}' has no decoder adapter ({supported})")
