"""Batched early exit for a MultiExitEncoder: rows that exit leave the batch before the next layer.

After each exit the rule returns a stop mask over the active rows (``ActiveRows``, the one exit
loop); the stopped rows' logits are scattered back to their original positions and the rest
(hidden states, layer context, rule state) are gathered into a smaller batch. No ``torch.all`` over the batch, no batch-size-1
assumption; the last exit stops every row still running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import ActiveRows
from mmexit.models.adapters import subset_context
from mmexit.models.encoder import MultiExitEncoder


@dataclass
class EarlyExitOutput:
    """logits [batch, labels] of each row's exit; exit_index [batch] (0-based); layers_used [batch]."""

    logits: Tensor
    exit_index: Tensor
    layers_used: Tensor


@torch.inference_mode()
def early_exit_forward(
    model: MultiExitEncoder,
    rule: ExitRule,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> EarlyExitOutput:
    """Run the encoder layer by layer, letting each row stop at the first exit its rule accepts."""
    hidden, context = model.embed(input_ids, attention_mask, token_type_ids)
    active = ActiveRows(rule, input_ids.shape[0], model.num_exits, input_ids.device)
    last_exit = model.num_exits - 1
    for layer in range(model.num_layers):
        hidden = model.run_layer(layer, hidden, context)  # [active, seq, hidden]
        exit_now = model.exit_after.get(layer)
        if exit_now is None:
            continue
        head = model.heads[exit_now]
        pooled = head.pool(hidden, context["attention_mask"])  # [active, hidden]
        logits = head.classify(pooled)  # [active, labels]
        if exit_now == last_exit:
            active.finish(logits)
            break
        keep = active.ask(exit_now, logits, pooled)
        if active.done:
            break
        if keep is not None:
            hidden, context = hidden[keep], subset_context(context, keep)
    layer_numbers = torch.tensor(model.exit_layers, device=input_ids.device)
    return EarlyExitOutput(active.outputs, active.exit_index, layer_numbers[active.exit_index])


@torch.inference_mode()
def all_exit_outputs(
    model: MultiExitEncoder,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Every exit's logits [num_exits, batch, labels] and pooled states [num_exits, batch, hidden].

    All layers run: exits decided from these are *simulated* (for sweeps and calibration).
    """
    return model.forward_exits(input_ids, attention_mask, token_type_ids, return_pooled=True)
