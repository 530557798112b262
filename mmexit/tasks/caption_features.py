"""Image encoder outputs for a captioner, with a frozen encoder's part read from the feature cache.

``encoder_outputs(model.encoder, paths, ...) == model.encoder(images)`` for the images at ``paths``
(before the trained projection). When the encoder is frozen (``model.encoder.freeze``) and a cache
folder is given (``data.cache_dir``), the frozen backbone's outputs come from
``mmexit.data.feature_cache`` (computed once per encoder weights, preprocessing and image bytes);
pooling (``pool_grid``) runs after the cache, so every grid shares it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mmexit.data.coco import read_image
from mmexit.data.feature_cache import FeatureCache
from mmexit.models.adapters.vision import frozen_stage
from mmexit.models.precision import compute_dtype


def encoder_outputs(encoder: nn.Module, paths: Sequence[Path], norm: dict, cache_dir: Optional[str | Path],
                    batch_size: int = 32, progress: bool = True) -> Tensor:
    """``encoder(images)`` [N, P, D] on CPU for the image files ``paths``; norm: {image_size, mean, std}."""
    frozen, after = frozen_stage(encoder)
    device = next(encoder.parameters()).device

    def compute(chunk: list[Path], module: nn.Module) -> Tensor:
        images = torch.stack([read_image(path, norm["image_size"], norm["mean"], norm["std"]) for path in chunk])
        with torch.inference_mode():
            return module(images.to(device, compute_dtype(module))).float().cpu()  # evaluate.dtype: bf16 weights

    if frozen is None or cache_dir is None:
        return torch.cat([compute(list(paths[i:i + batch_size]), encoder) for i in range(0, len(paths), batch_size)])
    preprocessing = {"image_size": norm["image_size"], "mean": list(norm["mean"]), "std": list(norm["std"]),
                     "orientation": "exif"}  # photos turned upright by their EXIF tag (data.coco.upright_rgb)
    cache = FeatureCache(cache_dir, frozen, preprocessing)
    tokens = cache.features(list(paths), lambda chunk: compute(chunk, frozen), batch_size, progress)
    with torch.inference_mode():
        dtype = compute_dtype(encoder)
        return torch.cat([after(tokens[i:i + 256].to(dtype)) for i in range(0, tokens.shape[0], 256)])
