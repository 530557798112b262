"""The reference decoder for the equivalence tests: recompute the whole prefix every step.

``UncachedStepper`` runs every position through transformers' own block (``GPT2Block.forward`` /
``LlamaDecoderLayer.forward``, via the adapter's teacher-forced ``layer``) each step, with no KV
cache; a LLaMA decoder's image prefix is recomputed with the caption every step. The cached engine
(``mmexit.inference.stepper.CachedStepper``) must produce the same tokens and exit layers under
every policy.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView


class UncachedStepper:
    """Reference: recompute the whole prefix each step through the decoder's own blocks.

    Under ``propagate``, positions that exited earlier keep their exit hidden state in deeper
    layers (so deeper K/V come from it); under ``oracle`` and ``deferred`` (whose cache is exact)
    every position runs every layer.
    """

    def __init__(self, model, features: Tensor, rule: Optional[ExitRule], max_len: int, policy: str = "propagate") -> None:
        self.model, self.rule, self.policy, self.features = model, rule, policy, features
        rows = features.shape[0]
        self.prefix = torch.zeros(rows, 0, dtype=torch.long, device=features.device)
        self.image_prefix = model.adapter.prefix_length(features)  # LLaMA: image tokens before the caption
        # layers run per position (the image prefix runs them all)
        self.ran = torch.full((rows, self.image_prefix), model.num_layers, dtype=torch.long, device=features.device)
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.catchup_layers = 0

    def select(self, index: Tensor) -> None:
        self.features, self.prefix, self.ran = self.features[index], self.prefix[index], self.ran[index]

    def step(self, tokens: Tensor, t: int) -> tuple[Tensor, Tensor]:
        model, rule = self.model, self.rule
        num_layers, num_exits = model.num_layers, model.num_exits
        total, device = tokens.shape[0], tokens.device
        ids = torch.cat([self.prefix, tokens[:, None]], dim=1)  # [R, t+1]
        hidden = model.embed(ids, torch.arange(t + 1, device=device))
        if self.image_prefix:
            hidden = torch.cat([self.features, hidden], dim=1)
        ran = torch.cat([self.ran, torch.full((total, 1), num_layers, dtype=torch.long, device=device)], dim=1)
        layers_out = torch.full((total,), num_layers, dtype=torch.long, device=device)
        undecided = torch.ones(total, dtype=torch.bool, device=device)
        state = rule.start(total, device) if rule is not None else {}
        logits_out = None
        for index in range(num_layers):
            new = model.adapter.layer(index, hidden, self.features)  # causal self-attn (sdpa); GPT-2: cross-attn to image
            hidden = torch.where((ran > index)[..., None], new, hidden)
            layer = index + 1
            if layer == num_layers or rule is None or layer not in self.exit_of_layer:
                continue
            exit_index = self.exit_of_layer[layer]
            logits = model.exit_logits(exit_index, hidden[:, -1])
            stop = rule.decide(ExitView(logits, exit_index, num_exits, hidden[:, -1]), state) & undecided
            if logits_out is None:
                logits_out = logits.new_empty(total, logits.shape[-1])
            logits_out[stop] = logits[stop]
            layers_out[stop] = layer
            if self.policy == "propagate":
                ran[stop, -1] = layer
            undecided &= ~stop
        final = model.exit_logits(num_exits - 1, hidden[:, -1])
        if logits_out is None:
            logits_out = final
        else:
            logits_out[undecided] = final[undecided]
        self.prefix, self.ran = ids, ran
        return logits_out, layers_out


