"""``CaptionPredictor.caption``: captions and layers per token for new images, batched decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from mmexit.data.coco import image_tensor
from mmexit.errors import DataError
from mmexit.evaluation.caption_eval import decode
from mmexit.serve.predictor import Predictor

ImageInput = Union[str, Path, Image.Image]


def open_image(item: ImageInput, position: int, size: int, mean, std) -> torch.Tensor:
    """A path or PIL image -> [3, size, size] as the run's encoder expects; one line if unreadable."""
    if isinstance(item, Image.Image):
        return image_tensor(item, size, mean, std)
    path = Path(item)
    try:
        with Image.open(path) as image:
            return image_tensor(image, size, mean, std)
    except FileNotFoundError:
        raise DataError(f"input {position}: image file does not exist: {path}") from None
    except Exception as error:  # PIL raises many types for corrupt files
        raise DataError(f"input {position}: cannot read image {path}: {error.__class__.__name__}") from None


class CaptionPredictor(Predictor):
    """Captions images with the run's captioner, rule, K/V policy and search (greedy or beam)."""

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[dict]:
        """Per image: ``caption``, ``tokens`` (ids) and ``layers`` (decoder layers each generated token ran;
        None under beam search)."""
        self.check_weights()
        model_cfg, evaluate = self.recipe["model"], self.recipe["evaluate"]
        size, mean, std = model_cfg["image_size"], tuple(model_cfg["image_mean"]), tuple(model_cfg["image_std"])
        pixels = torch.stack([open_image(item, i, size, mean, std) for i, item in enumerate(images)])
        results = []
        for start in range(0, pixels.shape[0], batch_size):
            features = self.model.encode(pixels[start:start + batch_size].to(self.device))
            rule = None if self.operating_point == "full" else self.rule
            result = decode(self.model, features, rule, evaluate, batch_size, self.processor)
            for row, tokens in enumerate(result.tokens):
                layers = result.token_layers[row] if result.token_layers else None
                results.append({"caption": self.processor.decode(tokens), "tokens": tokens, "layers": layers})
        return results
