"""Running the Multi-Model cascade (``models.cascade``) under an exit rule, batched, and its simulation.

The same rule classes serve here: a rule sees ``ExitView(logits, k, num_models, pooled)``, so
per-exit temperatures and calibrations (fitted on the stacked cascade logits from
``models.cascade.cascade_all_logits``) work per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import ActiveRows, simulate_exits
from mmexit.models.cascade import cumulative_layers, member_output
from mmexit.models.encoder import MultiExitEncoder


@dataclass
class CascadeOutput:
    """logits [batch, labels] of the model each row stopped at; exit_index [batch] (0-based model);
    layers_used [batch] (cumulative layers of every model the row ran)."""

    logits: Tensor
    exit_index: Tensor
    layers_used: Tensor



@torch.inference_mode()
def cascade_forward(
    models: Sequence[MultiExitEncoder],
    rule: ExitRule,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> CascadeOutput:
    """Run the cascade batched: only the rows that did not stop are handed to the next model."""
    num_models = len(models)
    active = ActiveRows(rule, input_ids.shape[0], num_models, input_ids.device)
    ids, mask, types = input_ids, attention_mask, token_type_ids
    for index, model in enumerate(models):
        logits, pooled = member_output(model, ids, mask, types)  # [active, labels], [active, hidden]
        if index == num_models - 1:
            active.finish(logits)
            break
        keep = active.ask(index, logits, pooled)
        if active.done:
            break
        if keep is not None:
            ids, mask = ids[keep], mask[keep]
            types = None if types is None else types[keep]
    charge = torch.tensor(cumulative_layers(models), device=input_ids.device)
    return CascadeOutput(active.outputs, active.exit_index, charge[active.exit_index])


def simulate_cascade(rule: ExitRule, all_logits: Tensor, cumulative: Sequence[int]) -> tuple[Tensor, Tensor]:
    """*Simulated* cascade on precomputed outputs [num_models, N, C]: exit index [N], layers charged [N]."""
    exit_index = simulate_exits(rule, all_logits)
    charge = torch.tensor(list(cumulative), device=exit_index.device)
    return exit_index, charge[exit_index]
