"""Extra training views of images: random crops (resized back) and horizontal flips (``train.augment``).

With a frozen encoder the features of every view are computed once, like those of the images
themselves, so a small image set gives the projection and the exits more than one view of each
photo. The views are made from the preprocessed (normalised) tensors: cropping, flipping and
bilinear resizing commute with the per-channel normalisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_DEFAULTS = {"views": 0, "flip": True, "min_crop": 0.7, "seed": 0}


def augmented_views(images: Tensor, views: int, flip: bool = True, min_crop: float = 0.7,
                    seed: int = 0) -> Tensor:
    """``views`` random views of every image: images [N, C, S, S] -> [views * N, C, S, S].

    View v of image i is row ``v * N + i``. Each view is a square crop whose side is a uniform
    fraction in [min_crop, 1] of the image's, at a uniform position, resized back to S (bilinear),
    then flipped left-right with probability 1/2 when ``flip``. Seeded: the same arguments give the
    same views.
    """
    if views <= 0:
        return images.new_empty((0, *images.shape[1:]))
    if not 0 < min_crop <= 1:
        raise ValueError(f"min_crop must be in (0, 1], got {min_crop}")
    generator = torch.Generator().manual_seed(int(seed))
    count, _, height, width = images.shape
    out = []
    for _ in range(views):
        sides = torch.empty(count).uniform_(min_crop, 1.0, generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5
        corners = torch.rand(count, 2, generator=generator)
        crops = []
        for index in range(count):
            crop_h = max(1, round(float(sides[index]) * height))
            crop_w = max(1, round(float(sides[index]) * width))
            top = int(float(corners[index, 0]) * (height - crop_h + 1))
            left = int(float(corners[index, 1]) * (width - crop_w + 1))
            crop = images[index:index + 1, :, top:top + crop_h, left:left + crop_w]
            if (crop_h, crop_w) != (height, width):
                crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            if flip and bool(flips[index]):
                crop = crop.flip(-1)
            crops.append(crop)
        out.append(torch.cat(crops))
    return torch.cat(out)


def with_views(images: Tensor, captions: list, augment: Optional[dict]) -> tuple[Tensor, list]:
    """Training images and their captions with ``augment["views"]`` extra views of every image appended
    (each view keeps its image's captions); unchanged when augment is None or views is 0."""
    settings = {**AUGMENT_DEFAULTS, **(augment or {})}
    if settings["views"] <= 0:
        return images, captions
    extra = augmented_views(images, settings["views"], settings["flip"], settings["min_crop"], settings["seed"])
    return torch.cat([images, extra]), list(captions) * (settings["views"] + 1)
