"""Image encoder adapters: a timm model or a Hugging Face ViT, as patch features [batch, patches, width]."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mmexit.errors import ModelLoadError


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


def build_image_encoder(spec: dict) -> nn.Module:
    """{type: timm | hf_vit, name, pretrained, kwargs} -> an encoder module with ``width``."""
    kind = spec.get("type", "timm")
    kwargs = dict(spec.get("kwargs") or {})
    if kind == "timm":
        return TimmEncoder(spec["name"], bool(spec.get("pretrained", False)), **kwargs)
    if kind == "hf_vit":
        return HFViTEncoder(spec["name"], bool(spec.get("pretrained", True)), **kwargs)
    raise ModelLoadError(f"model.encoder.type: unknown encoder type {kind!r}; allowed: timm, hf_vit")
