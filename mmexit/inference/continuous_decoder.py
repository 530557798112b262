"""Layer-level continuous caption decoding: every row advances on its own, rows of different steps share calls.

Step-synchronous decoding (``search.greedy_decode`` over ``CachedStepper``) runs one token step for
all rows at once: a step ends when its deepest row does, so at batch 16 the layers that early rows
skip save little wall-clock time. ``ContinuousDecoder`` is the continuous-batching core
(``continuous_core.ContinuousCore``: slot pool, per-layer queues, ``scheduler.Scheduler``) over the
decoder-layer runner (``decoder_layer_runner.DecoderLayerRunner``): each image owns a slot, its
current token waits in the queue of the decoder layer it runs next, each call runs ONE layer for
tokens of different caption positions, a token that exits re-enters layer 0 at its next position
and a finished caption's slot is refilled at once. Images waiting for a slot count in the layer-0
queue when slots are free: they take the slots (features, or the LLaMA prefix's prefill) just
before a layer-0 call, so new rows join the rows re-entering layer 0 in one call.

Each row's tokens and layers per token are those of ``greedy_decode`` on the image alone (batch 1,
``policy="propagate"``) up to float noise; the full model (``rule=None``) runs every layer for
every token, rows at different steps still sharing calls.

What the scheduler can win is bounded: a row's tokens run one after another, so every token of
depth d needs d calls at layers 0..d-1 in order after its row's previous token; with 16 rows some
row usually needs the last layer, and a call order that serves every row cannot be much shorter
than step-synchronous sweeps when every caption has the same length. The gain is largest when
captions differ in length (a finished row's slot is refilled at once instead of the batch running
on for its longest caption) and when tokens' depths are far apart (a short token's row can run its
next token while a deep one is still going down).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.continuous_core import ContinuousCore
from mmexit.inference.decoder_layer_runner import Caption, DecoderLayerRunner
from mmexit.inference.scheduler import SchedulerSettings
from mmexit.inference.search import DecodeResult, _exit_positions
from mmexit.models.kv_cache import PROPAGATE

POLICIES = (PROPAGATE,)


class ContinuousDecoder(ContinuousCore):
    """Greedy captions with per-token early exit, every row at its own step, over a pool of slots.

    model: a ``Captioner`` (GPT-2 or LLaMA decoder); rule: an exit rule, or None for the full model;
    slots: rows decoded at once; policy: the K/V policy of skipped layers (``propagate`` only);
    scheduler: the ``Scheduler``'s settings (age bound in layer calls, score weights, ``max_call``:
    the most tokens a layer call takes, at most ``slots``; slots > max_call gives a pool deeper than a
    call); keep_logits: keep each token's exit logits in its ``Caption`` (tests).

    ``submit(features [n, patches, width])`` queues images (any time, also between ``step`` calls) and
    returns their ids; ``step()`` makes one scheduling decision and runs one layer call; ``run()`` steps
    until every submitted image is captioned and returns ``results`` ({image id: Caption}).
    """

    def __init__(self, model, rule: Optional[ExitRule], max_len: int, slots: int = 16, bos_id: int = 1,
                 eos_id: int = 2, policy: str = PROPAGATE, scheduler: SchedulerSettings = SchedulerSettings(),
                 keep_logits: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"the continuous decoder supports policy 'propagate' only (per-row K/V by state "
                             f"propagation); got {policy!r}: use greedy_decode for 'deferred' and 'oracle'")
        runner = DecoderLayerRunner(model, rule, max_len, slots, bos_id, eos_id, keep_logits)
        max_call = slots if scheduler.max_call is None else min(int(scheduler.max_call), slots)
        super().__init__(runner, slots, replace(scheduler, max_call=max_call))

    @torch.inference_mode()
    def step(self) -> bool:
        return super().step()

    @torch.inference_mode()
    def submit(self, features: Tensor) -> list[int]:
        return super().submit(features)


def captions_to_result(model, captions: list[Caption]) -> DecodeResult:
    """``DecodeResult`` of captions in input order (``step_layers`` stays empty: there are no steps)."""
    layers = torch.tensor([layer for caption in captions for layer in caption.layers], dtype=torch.long)
    return DecodeResult([c.tokens for c in captions], layers, _exit_positions(model, layers),
                        [c.layers for c in captions])


def continuous_greedy_decode(model, features: Tensor, rule: Optional[ExitRule] = None, max_len: int = 20,
                             bos_id: int = 1, eos_id: int = 2, policy: str = PROPAGATE, slots: int = 16,
                             scheduler: SchedulerSettings = SchedulerSettings()) -> DecodeResult:
    """Greedy captions for features [B, patches, width] by the continuous decoder (``slots`` rows at
    once; scheduler: its settings, see ``ContinuousDecoder``); the same return type as
    ``greedy_decode`` (``step_layers`` stays empty)."""
    decoder = ContinuousDecoder(model, rule, max_len, slots, bos_id, eos_id, policy, scheduler)
    ids = decoder.submit(features)
    captions = decoder.run()
    return captions_to_result(model, [captions[image] for image in ids])
