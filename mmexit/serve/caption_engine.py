"""Serving captions with the continuous decoder: images of many requests share one pool of slots.

``ContinuousCaptionEngine`` feeds ``mmexit.inference.continuous_decoder.ContinuousDecoder`` (the
continuous-batching core over the decoder-layer runner): the model thread takes as many queued
images as there are free slots (whole requests or parts of them), encodes them and submits them,
then runs layer calls (each call serves the tokens waiting at one decoder layer, whichever request
and step they belong to). A caption that finishes frees
its slot at once for the next queued image, and its request is answered when its last image is.
Each caption equals the batched early-exit decoder's (greedy, ``propagate`` K/V policy; tested), so
only recipes decoding that way can use this engine.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from mmexit.inference.continuous_decoder import ContinuousDecoder
from mmexit.inference.scheduler import SchedulerSettings
from mmexit.models.kv_cache import PROPAGATE
from mmexit.serve.caption_predictor import open_image
from mmexit.serve.engine_base import LOG, BaseEngine, Request


def continuous_captions_supported(recipe: dict) -> Optional[str]:
    """None when the run's decoding suits the continuous decoder, else the reason it does not."""
    evaluate = recipe["evaluate"]
    if evaluate.get("decoding", "greedy") != "greedy":
        return f"evaluate.decoding is {evaluate['decoding']!r} (the continuous decoder is greedy only)"
    if evaluate.get("policy", PROPAGATE) != PROPAGATE:
        return f"evaluate.policy is {evaluate['policy']!r} (the continuous decoder supports 'propagate' only)"
    return None


class ContinuousCaptionEngine(BaseEngine):
    """Images -> caption dicts (``caption``, ``tokens``, ``layers``) through a continuous decoder of
    ``slots`` rows; ``calls_per_step``: layer calls between two looks at the request queue;
    ``max_wait_calls``: the scheduler's age bound in layer calls (None: twice the decoder's layers)."""

    kind = "continuous"

    def __init__(self, predictor, slots: int = 16, max_queue: int = 1024, max_queue_wait: Optional[float] = None,
                 calls_per_step: Optional[int] = None, max_wait_calls: Optional[int] = None) -> None:
        reason = continuous_captions_supported(predictor.recipe)
        if reason:
            raise ValueError(f"the continuous caption engine cannot serve this run: {reason}")
        super().__init__(slots, max_queue, max_queue_wait)
        self.predictor = predictor
        self.slots = int(slots)
        self.calls_per_step = calls_per_step or predictor.model.num_layers
        self.settings = SchedulerSettings(max_wait=max_wait_calls)
        self.owners: dict[int, tuple[Request, int]] = {}  # decoder image id -> (request, row)
        self.decoder = self._new_decoder()

    def _new_decoder(self) -> ContinuousDecoder:
        predictor = self.predictor
        rule = None if predictor.operating_point == "full" else predictor.rule
        tokenizer = predictor.processor
        return ContinuousDecoder(predictor.model, rule, predictor.recipe["evaluate"]["max_len"], self.slots,
                                 tokenizer.bos_id, tokenizer.eos_id, scheduler=self.settings)

    def describe(self) -> dict:
        return super().describe() | {"slots": self.slots, "in_flight": len(self.owners)}

    def _busy(self) -> bool:
        return bool(self.owners)

    def _open(self, taken: list[tuple[Request, int]]) -> tuple[list[tuple[Request, int]], Optional[torch.Tensor]]:
        """The rows whose image opens, and their pixels [n, 3, S, S] (normalised as in training); a
        request with an image that does not open fails alone, at once."""
        model = self.predictor.recipe["model"]
        size, mean, std = model["image_size"], tuple(model["image_mean"]), tuple(model["image_std"])
        opened = []
        for request, row in taken:
            try:
                opened.append(((request, row), open_image(request.items[row], row, size, mean, std)))
            except Exception as error:  # noqa: BLE001 - the request's answer
                self._fail(request, error)
        opened = [(pair, pixels) for pair, pixels in opened if not pair[0].dead]
        if not opened:
            return [], None
        return [pair for pair, _ in opened], torch.stack([pixels for _, pixels in opened]).to(self.predictor.device)

    def _step(self) -> None:
        decoder = self.decoder
        with self.cond:
            taken = self._take(max(0, decoder.room))
        start = time.perf_counter()
        taken, pixels = self._open(taken) if taken else ([], None)
        if taken:
            try:
                images = decoder.submit(self.predictor.model.encode(pixels))
            except Exception as error:  # these images only: the captions in flight go on
                LOG.exception("encoding images failed")
                for request, _ in taken:
                    self._fail(request, error)
                return
            for image, pair in zip(images, taken):
                self.owners[image] = pair
        for _ in range(self.calls_per_step):
            if not decoder.step():
                break
        finished = list(decoder.results.items())
        decoder.results.clear()
        self._account(time.perf_counter() - start, len(finished))
        tokenizer = self.predictor.processor
        for image, caption in finished:
            request, row = self.owners.pop(image)
            self._answer(request, row, {"caption": tokenizer.decode(caption.tokens), "tokens": caption.tokens,
                                        "layers": caption.layers})

    def _fail_in_flight(self, error: BaseException) -> None:
        for request, _ in self.owners.values():
            self._fail(request, error)
        self.owners = {}
        self.decoder = self._new_decoder()  # its slots and queues may be half-updated
