"""``CaptionPredictor.caption``: captions and layers per token for new images, batched decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from tqdm import tqdm

from mmexit.data.coco import image_tensor
from mmexit.errors import DataError
from mmexit.evaluation.caption_eval import decode
from mmexit.serve.predictor import Predictor

ImageInput = Union[str, Path, Image.Image]


def open_image(item: ImageInput, position: int, size: int, mean, std) -> torch.Tensor:
    """A path or PIL image -> [3, size, size] as the run's encoder expects; one line if unreadable."""
    if isinstance(item, Image.Image):
        return image_tensor(item, size, mean, std)
    return _with_image(item, position, lambda image: image_tensor(image, size, mean, std))


def check_image(item: ImageInput, position: int) -> None:
    """Fail before any decoding when a path is missing or not an image (its header only is read)."""
    if not isinstance(item, Image.Image):
        _with_image(item, position, lambda image: None)


def _with_image(item: str | Path, position: int, use):
    """use(the opened image), or DataError naming the input's position and path."""
    path = Path(item)
    try:
        with Image.open(path) as image:
            return use(image)
    except FileNotFoundError:
        raise DataError(f"input {position}: image file does not exist: {path}") from None
    except Exception as error:  # PIL raises many types for corrupt files
        raise DataError(f"input {position}: cannot read image {path}: {error.__class__.__name__}") from None


def search_settings(evaluate: dict, beam_size: Optional[int] = None, length_penalty: Optional[float] = None,
                    no_repeat_ngram: Optional[int] = None) -> dict:
    """The run's ``evaluate`` settings with the search overridden where given (one DataError line for a
    bad value): beam_size 1 is greedy decoding, more is beam search."""
    evaluate = dict(evaluate)
    if beam_size is not None:
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise DataError(f"beam_size: expected an integer >= 1 (1: greedy), got {beam_size!r}")
        evaluate.update(decoding="beam" if beam_size > 1 else "greedy", beam_size=beam_size)
    if length_penalty is not None:
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise DataError(f"length_penalty: expected a number, got {length_penalty!r}")
        evaluate["length_penalty"] = float(length_penalty)
    if no_repeat_ngram is not None:
        if isinstance(no_repeat_ngram, bool) or not isinstance(no_repeat_ngram, int) or no_repeat_ngram < 0:
            raise DataError(f"no_repeat_ngram: expected an integer >= 0 (0: off), got {no_repeat_ngram!r}")
        evaluate["no_repeat_ngram"] = no_repeat_ngram
    if evaluate["decoding"] != "beam" and (length_penalty is not None or no_repeat_ngram):
        raise DataError("length_penalty and no_repeat_ngram apply to beam search: give beam_size > 1 too "
                        "(this run decodes greedily)")
    return evaluate


class CaptionPredictor(Predictor):
    """Captions images with the run's captioner, rule, K/V policy and search (greedy or beam)."""

    @torch.inference_mode()
    def caption(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool = False,
                beam_size: Optional[int] = None, length_penalty: Optional[float] = None,
                no_repeat_ngram: Optional[int] = None) -> list[dict]:
        """Per image: ``caption``, ``tokens`` (ids) and ``layers`` (decoder layers each generated token ran;
        None under beam search). progress: a bar over the photos on stderr.

        The search is the run's ``evaluate`` settings unless given: beam_size (1: greedy), length_penalty
        and no_repeat_ngram (beam search only; e.g. 5, 0.5, 2 for the Flickr8k recipe's best captions)."""
        self.check_weights()
        model_cfg = self.recipe["model"]
        evaluate = search_settings(self.recipe["evaluate"], beam_size, length_penalty, no_repeat_ngram)
        size, mean, std = model_cfg["image_size"], tuple(model_cfg["image_mean"]), tuple(model_cfg["image_std"])
        for position, item in enumerate(images):
            check_image(item, position)
        results = []
        bar = tqdm(total=len(images), desc="photos", unit="photo", disable=not progress)
        for start in range(0, len(images), batch_size):  # a batch's photos decoded at a time: a folder of
            pixels = torch.stack([open_image(item, start + i, size, mean, std)  # thousands fits in memory
                                  for i, item in enumerate(images[start:start + batch_size])])
            features = self.model.encode(pixels.to(self.device))
            rule = None if self.operating_point == "full" else self.rule
            result = decode(self.model, features, rule, evaluate, batch_size, self.processor)
            for row, tokens in enumerate(result.tokens):
                layers = result.token_layers[row] if result.token_layers else None
                results.append({"caption": self.processor.decode(tokens), "tokens": tokens, "layers": layers})
            bar.update(len(result.tokens))
        bar.close()
        return results
