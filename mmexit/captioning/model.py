"""The multi-exit captioner: a ViT image encoder + a GPT-2 decoder with cross-attention.

Wrap, don't fork: the encoder is ``timm.create_model`` (or Hugging Face ``ViTModel``), the
decoder is transformers' ``GPT2LMHeadModel`` built with ``add_cross_attention=True``. mmexit adds
a linear projection from the encoder width to the decoder width and exits after a list of
decoder layers.

Exit heads (``exit_head``):
- ``shared`` (default): the decoder's final layer norm ``ln_f`` and the shared (tied) LM head,
  applied to the hidden state after the exit's layer. No new parameters.
- ``norm``: a learned LayerNorm per internal exit (initialised from ``ln_f``) + the shared LM head.
- ``adapter``: a per-exit residual linear adapter (zero-initialised) before ``ln_f`` + LM head.
The last exit is always the decoder's own ``ln_f`` + LM head (the full model).

A spec dict (``captioner.json``) rebuilds the architecture; weights live in ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmexit.errors import ModelLoadError

EXIT_HEADS = ("shared", "norm", "adapter")


class TimmEncoder(nn.Module):
    """timm backbone -> patch features [batch, patches, width] (NHWC maps are flattened)."""

    def __init__(self, name: str, pretrained: bool = False, **kwargs: Any) -> None:
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except Exception as error:  # hub download failures, unknown names, bad kwargs
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"timm encoder {name!r} (pretrained={pretrained}) cannot be built: {message}") from None
        self.width = int(self.model.num_features)

    def forward(self, images: Tensor) -> Tensor:
        features = self.model.forward_features(images)
        if features.ndim == 4:  # Swin and other NHWC / NCHW feature maps
            if features.shape[-1] != self.width:
                features = features.permute(0, 2, 3, 1)
            features = features.flatten(1, 2)
        return features  # [batch, patches, width]


class HFViTEncoder(nn.Module):
    """Hugging Face ``ViTModel`` (e.g. google/vit-base-patch16-224-in21k) -> last hidden state."""

    def __init__(self, name: str, pretrained: bool = True, **kwargs: Any) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        try:
            if pretrained:
                self.model = ViTModel.from_pretrained(name, add_pooling_layer=False)
            else:
                self.model = ViTModel(ViTConfig(**kwargs), add_pooling_layer=False)
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"Hugging Face ViT {name!r} cannot be loaded (offline?): {message}") from None
        self.width = int(self.model.config.hidden_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).last_hidden_state


def build_decoder(vocab_size: int, pretrained: str | None = None, special_ids: dict | None = None,
                  **config: Any) -> nn.Module:
    """GPT2LMHeadModel with cross-attention: random init from a GPT2Config, or hub/local weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if pretrained:
        try:
            decoder = GPT2LMHeadModel.from_pretrained(pretrained, add_cross_attention=True,
                                                      attn_implementation="sdpa")
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"GPT-2 decoder {pretrained!r} cannot be loaded (offline?): {message}") from None
        if decoder.config.vocab_size != vocab_size:
            decoder.resize_token_embeddings(vocab_size)
        return decoder
    ids = {f"{key}_token_id": value for key, value in (special_ids or {}).items()}
    gpt2_config = GPT2Config(vocab_size=vocab_size, add_cross_attention=True, attn_implementation="sdpa",
                             **ids, **config)
    return GPT2LMHeadModel(gpt2_config)


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
    """Encoder -> projection -> GPT-2 decoder with exits after ``exits`` (1-based layer numbers)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, exits: list[int], exit_head: str = "shared",
                 spec: dict | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.spec = spec or {}
        width = decoder.config.n_embd
        self.num_layers = decoder.config.n_layer
        exits = sorted(set(int(e) for e in exits))
        if not exits or exits[0] < 1 or exits[-1] > self.num_layers:
            raise ValueError(f"exits must be layer numbers in 1..{self.num_layers}, got {exits}")
        if exits[-1] != self.num_layers:
            exits.append(self.num_layers)
        self.exits = exits
        if exit_head not in EXIT_HEADS:
            raise ValueError(f"exit_head must be one of {EXIT_HEADS}")
        self.exit_head = exit_head
        self.projection = nn.Linear(encoder.width, width)
        internal = len(exits) - 1
        if exit_head == "norm":
            self.exit_modules = nn.ModuleList(nn.LayerNorm(width, eps=decoder.config.layer_norm_epsilon)
                                              for _ in range(internal))
            for norm in self.exit_modules:
                norm.load_state_dict(decoder.transformer.ln_f.state_dict())
        elif exit_head == "adapter":
            self.exit_modules = nn.ModuleList(ExitAdapter(width) for _ in range(internal))
        else:
            self.exit_modules = nn.ModuleList()

    # ------------------------------------------------------------------ parts the decoders read
    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.transformer.h

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def encode(self, images: Tensor) -> Tensor:
        """images [batch, 3, H, W] -> decoder-width image features [batch, patches, n_embd]."""
        return self.projection(self.encoder(images))

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token + position embeddings; tokens [...], positions broadcastable -> [..., n_embd]."""
        transformer = self.decoder.transformer
        return transformer.wte(tokens) + transformer.wpe(positions)

    def exit_logits(self, hidden: Tensor, exit_index: int) -> Tensor:
        """hidden [..., n_embd] after the exit's layer -> logits [..., vocab]."""
        if exit_index < len(self.exit_modules):
            module = self.exit_modules[exit_index]
            hidden = module(hidden) if self.exit_head == "norm" else self.decoder.transformer.ln_f(module(hidden))
        else:
            hidden = self.decoder.transformer.ln_f(hidden)
        return self.decoder.lm_head(hidden)

    def forward_exits(self, features: Tensor, input_ids: Tensor) -> list[Tensor]:
        """Teacher-forced logits of every exit.

        features [batch, patches, n_embd]; input_ids [batch, seq] (right-padded; causal attention
        keeps real positions from seeing the padding). Returns num_exits tensors [batch, seq, vocab].
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.decoder.transformer.drop(self.embed(input_ids, positions))
        outputs, exit_position = [], 0
        for layer, block in enumerate(self.blocks, start=1):
            # sdpa attention with no mask: causal self-attention, full cross-attention
            hidden = block(hidden, None, None, features)
            if layer == self.exits[exit_position]:
                outputs.append(self.exit_logits(hidden, exit_position))
                exit_position += 1
        return outputs


def build_captioner(spec: dict) -> Captioner:
    """Build from a spec: {encoder: {type, name, pretrained, kwargs}, decoder: {pretrained, config},
    vocab_size, special_ids: {bos, eos, pad}, exits, exit_head}."""
    encoder_spec = spec["encoder"]
    kind = encoder_spec.get("type", "timm")
    kwargs = dict(encoder_spec.get("kwargs") or {})
    if kind == "timm":
        encoder = TimmEncoder(encoder_spec["name"], bool(encoder_spec.get("pretrained", False)), **kwargs)
    elif kind == "hf_vit":
        encoder = HFViTEncoder(encoder_spec["name"], bool(encoder_spec.get("pretrained", True)), **kwargs)
    else:
        raise ValueError(f"unknown encoder type {kind!r}")
    decoder_spec = spec["decoder"]
    decoder = build_decoder(spec["vocab_size"], decoder_spec.get("pretrained"), spec.get("special_ids"),
                            **(decoder_spec.get("config") or {}))
    exits = spec.get("exits", "all")
    if exits == "all":
        exits = list(range(1, decoder.config.n_layer + 1))
    return Captioner(encoder, decoder, list(exits), spec.get("exit_head", "shared"), spec=spec)


def save_captioner(model: Captioner, folder: str | Path) -> None:
    """Write ``captioner.json`` (the spec, with pretrained weights switched off) + ``model.safetensors``."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(model.spec))
    spec["encoder"]["pretrained"] = False
    spec["decoder"]["pretrained"] = None
    if model.spec["decoder"].get("pretrained"):  # keep the architecture of the hub model
        spec["decoder"]["config"] = {k: v for k, v in model.decoder.config.to_dict().items()
                                     if k in ("n_layer", "n_embd", "n_head", "n_positions", "n_inner",
                                              "layer_norm_epsilon", "activation_function")}
    spec["exits"] = model.exits
    (folder / "captioner.json").write_text(json.dumps(spec, indent=2))
    save_model(model, str(folder / "model.safetensors"))


def load_captioner(folder: str | Path) -> Captioner:
    """Rebuild a captioner saved by ``save_captioner``."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if not (folder / "captioner.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelLoadError(f"{folder}: not an mmexit captioner folder (needs captioner.json and model.safetensors)")
    spec = json.loads((folder / "captioner.json").read_text())
    model = build_captioner(spec)
    load_model(model, str(folder / "model.safetensors"))
    return model
