"""The multi-exit captioner: an image encoder + a decoder with exits after chosen decoder layers.

Wrap, don't fork: the encoder is ``timm.create_model`` (or Hugging Face ``ViTModel``), see
``mmexit.models.adapters.vision``; the decoder (``decoder.type``) is a family of the decoder
registry (``mmexit.models.adapters.decoders``), driven through its adapter
(``mmexit.models.adapters.decoder_protocol.DecoderAdapter``): ``gpt2`` (the default) is
transformers' ``GPT2LMHeadModel`` built with ``add_cross_attention=True`` (it reads the image by
cross-attention), ``llama`` a ``LlamaForCausalLM`` (the projected image patches are a prefix of
input embeddings before the caption). mmexit adds a projection (linear, or a small MLP) from the
encoder width to the decoder width and exits after a list of decoder layers. The encoder
(``encoder.freeze``) and the decoder (``decoder.freeze``) may stay frozen: then only the
projection and the exit heads train; a frozen pretrained decoder may get LoRA updates
(``decoder.lora``, peft; ``mmexit.models.lora``), which train with them and are merged into the
decoder's weights before it is saved.

``head_ids`` (spec; recipe ``model.head_vocabulary: captions``): every head computes logits only
for these token ids (those of the training captions + specials), -1e9 elsewhere. A 49k-token LM
head costs as much as ~8 SmolLM2 layers per token, which a per-token exit check cannot afford.

Exit heads (``exit_head``):
- ``shared`` (default): the decoder's final norm (GPT-2 ``ln_f`` / LLaMA RMSNorm ``model.norm``)
  and the shared LM head (tied to the embeddings when the decoder ties them), applied to the
  hidden state after the exit's layer. No new parameters.
- ``norm``: a learned copy of the final norm per internal exit + the shared LM head.
- ``adapter``: a per-exit residual linear adapter (zero-initialised) before the final norm + LM head.
The last exit is the decoder's own final norm + LM head (the full model); with a frozen decoder
and ``adapter`` heads it gets an adapter too (the frozen head alone cannot adapt to captions).

A spec dict (``captioner.json``) rebuilds the architecture; weights live in ``model.safetensors``
(all of them, a frozen pretrained decoder's included: a saved captioner never reads its source again).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
import torch
from torch import Tensor, nn

from mmexit.errors import ModelLoadError, RecipeError
from mmexit.models.adapters.decoder_protocol import DecoderAdapter
from mmexit.models.adapters.decoders import decoder_adapter, decoder_family
from mmexit.models.adapters.vision import FrozenEncoder, build_image_encoder
from mmexit.models.head_rows import HeadRows, scores
from mmexit.models.lora import add_lora, check_lora, is_lora_parameter, merge_lora
from mmexit.models.precision import compute_dtype

EXIT_HEADS = ("shared", "norm", "adapter")


class ExitAdapter(nn.Module):
    """h + W h (W zero-initialised): a per-exit correction before the shared head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.linear(hidden)


class Captioner(nn.Module):
    """Encoder -> projection -> decoder (GPT-2 or LLaMA) with exits after ``exits`` (1-based layer numbers)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, exits: list[int], exit_head: str = "shared",
                 spec: dict | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.adapter: DecoderAdapter = decoder_adapter(decoder)
        self.spec = spec or {}
        width = self.adapter.width
        self.num_layers = self.adapter.num_layers
        exits = sorted(set(int(e) for e in exits))
        if not exits or exits[0] < 1 or exits[-1] > self.num_layers:
            raise RecipeError(f"model.exits: layer numbers must be in 1..{self.num_layers}, got {exits}")
        if exits[-1] != self.num_layers:
            exits.append(self.num_layers)
        self.exits = exits
        if exit_head not in EXIT_HEADS:
            raise RecipeError(f"model.exit_head: {exit_head!r} is not allowed; allowed: {', '.join(EXIT_HEADS)}")
        self.exit_head = exit_head
        self.projection = build_projection(self.spec.get("projection", "linear"), encoder.width, width)
        head_ids = self.spec.get("head_ids")  # the token ids the heads may emit (None: the whole vocabulary)
        self.register_buffer("head_ids", torch.tensor(sorted(set(head_ids)), dtype=torch.long) if head_ids else None,
                             persistent=False)
        self.head_rows = HeadRows()  # the LM head's rows for head_ids / a draft vocabulary, kept while weights stay
        self.encoder_frozen = any(isinstance(module, FrozenEncoder) for module in encoder.modules())
        self.decoder_frozen = bool((self.spec.get("decoder") or {}).get("freeze"))
        if self.decoder_frozen:  # the pretrained LM stays as it is; exits and the projection train
            for parameter in decoder.parameters():
                parameter.requires_grad_(False)
        internal = len(exits) - 1
        # a frozen decoder's own head cannot learn the captions' style: its last exit gets an adapter too
        self.final_adapter = exit_head == "adapter" and self.decoder_frozen
        if exit_head == "norm":
            self.exit_modules = nn.ModuleList(copy.deepcopy(self.adapter.norm_module) for _ in range(internal))
        elif exit_head == "adapter":
            self.exit_modules = nn.ModuleList(ExitAdapter(width) for _ in range(internal + self.final_adapter))
        else:
            self.exit_modules = nn.ModuleList()

    # ------------------------------------------------------------------ parts the decoders read
    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def exit_layers(self) -> list[int]:
        return self.exits

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    def head_kind(self, parameter_name: str) -> str | None:
        """"internal" for a parameter of an internal exit's head, "frozen" for a frozen encoder's or
        decoder's (never trained), None for the rest (the backbone, a frozen decoder's LoRA matrices
        included; the final head is the decoder's own ln_f + LM head). The trainer's
        ``set_trainable`` reads this."""
        if parameter_name.startswith("exit_modules."):
            last = self.final_adapter and parameter_name.startswith(f"exit_modules.{len(self.exit_modules) - 1}.")
            return "final" if last else "internal"
        if self.encoder_frozen and parameter_name.startswith("encoder."):
            return "frozen"
        if self.decoder_frozen and parameter_name.startswith("decoder.") and not is_lora_parameter(parameter_name):
            return "frozen"
        return None

    #: modules whose weights stay float under int8 dynamic quantization (``mmexit.models.precision``): the
    #: LM head's rows are read directly (``head_ids``), a quantized Linear has no weight tensor
    float_modules = ("decoder.lm_head",)

    def input_dtype(self) -> torch.dtype:
        """The dtype images and encoder features are cast to: the projection's (float32 under int8)."""
        return compute_dtype(self.projection)

    def project(self, encoded: Tensor) -> Tensor:
        """Encoder outputs [batch, patches, encoder width] (e.g. cached, float32) -> image features
        [batch, patches, width] in the model's precision."""
        return self.projection(encoded.to(self.input_dtype()))

    def encode(self, images: Tensor) -> Tensor:
        """images [batch, 3, H, W] -> decoder-width image features [batch, patches, width]
        (GPT-2: cross-attention inputs; LLaMA: the prefix embeddings), in the model's precision."""
        return self.project(self.encoder(images.to(compute_dtype(self.encoder))))

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token + position embeddings; tokens [...], positions broadcastable -> [..., width]."""
        return self.adapter.embed(tokens, positions)

    def exit_hidden(self, exit_index: int, hidden: Tensor) -> Tensor:
        """The hidden state [..., width] after exit ``exit_index``'s layer -> what its LM head reads
        (the exit's adapter or norm, then the final norm)."""
        if exit_index < len(self.exit_modules):
            module = self.exit_modules[exit_index]
            return module(hidden) if self.exit_head == "norm" else self.adapter.final_norm(module(hidden))
        return self.adapter.final_norm(hidden)

    def exit_scores(self, exit_index: int, hidden: Tensor, token_ids: Tensor) -> Tensor:
        """Exit ``exit_index``'s logits for ``token_ids`` [n] only (sorted, a subset of the head's
        tokens): hidden [..., width] -> [..., n]. What a draft over a short vocabulary computes."""
        return scores(self.exit_hidden(exit_index, hidden), self.adapter.decoder.lm_head, token_ids, self.head_rows)

    def exit_logits(self, exit_index: int, hidden: Tensor) -> Tensor:
        """Exit ``exit_index``'s logits [..., vocab] from the hidden state [..., width] after its layer."""
        hidden = self.exit_hidden(exit_index, hidden)
        if self.head_ids is None:
            return self.adapter.lm_head(hidden)
        # a caption vocabulary: only its rows of the LM head are computed (SmolLM2: ~7.4k of 49k rows,
        # an exit head then costs less than a layer); the other tokens get a large finite negative
        # (not -inf: 0 * inf would make a distillation term NaN)
        head = self.adapter.decoder.lm_head  # nn.Linear [vocab, width] (every adapter: DecoderAdapter.decoder)
        rows = scores(hidden, head, self.head_ids, self.head_rows)
        floor = -3.0e4 if rows.dtype == torch.float16 else -1.0e9
        logits = rows.new_full((*hidden.shape[:-1], self.vocab_size), floor)
        return logits.index_copy_(-1, self.head_ids, rows)

    def forward_exits(self, features: Tensor, input_ids: Tensor) -> Tensor:
        """Teacher-forced logits of every exit.

        features [batch, patches, width]; input_ids [batch, seq] (right-padded; causal attention
        keeps real positions from seeing the padding). Returns [num_exits, batch, seq, vocab].
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.adapter.embed_dropout(self.embed(input_ids, positions))
        prefix = self.adapter.prefix_length(features)  # LLaMA: the image tokens come first
        if prefix:
            hidden = torch.cat([features.to(hidden.dtype), hidden], dim=1)
        outputs, exit_position = [], 0
        for layer in range(1, self.num_layers + 1):
            hidden = self.adapter.layer(layer - 1, hidden, features)
            if layer == self.exits[exit_position]:
                outputs.append(self.exit_logits(exit_position, hidden[:, prefix:]))
                exit_position += 1
        return torch.stack(outputs)

    def forward(self, images: Tensor | None = None, input_ids: Tensor | None = None, final_only: bool = False,
                encoded: Tensor | None = None) -> Tensor:
        """Training entry point (losses call ``model(...)`` so DDP wrappers see the forward).

        images [batch, 3, H, W], or ``encoded`` [batch, patches, encoder width]: the encoder's output
        computed earlier (a frozen encoder's features are the same every epoch); input_ids [batch,
        seq]. Returns [num_exits, batch, seq, vocab] (``final_only``: [1, batch, seq, vocab]).
        """
        features = self.project(encoded) if encoded is not None else self.encode(images)
        logits = self.forward_exits(features, input_ids)
        return logits[-1:] if final_only else logits


PROJECTIONS = ("linear", "mlp")


def build_projection(kind: str, encoder_width: int, width: int) -> nn.Module:
    """Encoder width -> decoder width: one linear map, or ``mlp`` (linear, GELU, linear; ClipCap's
    mapping for a frozen decoder)."""
    if kind == "linear":
        return nn.Linear(encoder_width, width)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(encoder_width, width), nn.GELU(), nn.Linear(width, width))
    raise RecipeError(f"model.projection: {kind!r} is not allowed; allowed: {', '.join(PROJECTIONS)}")


def build_captioner(spec: dict) -> Captioner:
    """Build from a spec: {encoder: {type, name, pretrained, freeze, pool_grid, kwargs}, decoder:
    {type (a key of ``DECODER_FAMILIES``: gpt2 | llama), pretrained, freeze, config}, projection,
    vocab_size, special_ids: {bos, eos, pad}, exits, exit_head}.

    decoder.config: the family's HF config keys (GPT2Config, LlamaConfig); decoder.pretrained: a hub
    name or local HF folder (e.g. ``resolve_packaged("pypi:smollm2-135m")``); decoder.lora:
    {r, alpha, dropout, targets} LoRA on the frozen pretrained decoder (``mmexit.models.lora``)."""
    decoder_spec = spec["decoder"]
    family = decoder_family(decoder_spec.get("type"))
    lora = check_lora(decoder_spec)  # before anything loads
    if lora:
        spec = {**spec, "decoder": {**decoder_spec, "lora": lora}}  # the settings with their defaults
    encoder = build_image_encoder(spec["encoder"])
    decoder = family.build(spec["vocab_size"], decoder_spec.get("pretrained"), spec.get("special_ids"),
                           **(decoder_spec.get("config") or {}))
    exits = spec.get("exits", "all")
    if exits == "all":
        exits = list(range(1, decoder_adapter(decoder).num_layers + 1))
    model = Captioner(encoder, decoder, list(exits), spec.get("exit_head", "shared"), spec=spec)
    if lora:  # after the Captioner froze the decoder: only the LoRA matrices of it train
        add_lora(model.decoder, family.name, lora)
    return model


def save_captioner(model: Captioner, folder: str | Path) -> None:
    """Write ``captioner.json`` (the spec, with pretrained weights switched off) + ``model.safetensors``
    (every weight, frozen ones included).

    LoRA layers still in the decoder are merged into its weights first, in place (the model is
    plain afterwards); the saved spec then has ``lora: null`` and ``lora_merged``: the settings."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merge_lora(model.decoder)
    spec = json.loads(json.dumps(model.spec))
    spec["encoder"]["pretrained"] = False
    spec["decoder"]["pretrained"] = None
    if spec["decoder"].get("lora"):  # the saved weights hold the update: rebuild a plain decoder
        spec["decoder"]["lora_merged"] = spec["decoder"]["lora"]
        spec["decoder"]["lora"] = None
    if model.spec["decoder"].get("pretrained"):  # keep the architecture of the hub model
        spec["decoder"]["config"] = model.adapter.architecture()
    spec["exits"] = model.exits
    (folder / "captioner.json").write_text(json.dumps(spec, indent=2))
    save_model(model, str(folder / "model.safetensors"))


def load_captioner(folder: str | Path, weights: bool = True) -> Captioner:
    """Rebuild a captioner saved by ``save_captioner``; with ``weights=False`` its structure only
    (every tensor on the meta device, the weights file not read)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if not (folder / "captioner.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"{folder}: not an mmexit captioner folder (needs captioner.json and model.safetensors)")
    spec = json.loads((folder / "captioner.json").read_text())
    if not weights:
        with torch.device("meta"):
            return build_captioner(spec)
    model = build_captioner(spec)
    load_model(model, str(folder / "model.safetensors"))
    return model
