"""Distil a trained captioner's internal exits toward its own full model, backbone untouched.

A self-speculative draft is accepted when exit E's greedy token equals the full model's. Exits
trained jointly learn the human captions (label-smoothed) and the last exit's distribution; here
each internal exit's own parameters (the ``adapter`` or ``norm`` exit module) are trained further on
the full model's greedy captions, teacher-forced, with the full model's token at every position as
the target (cross-entropy over the heads' tokens). Layers, projection and the last exit's head do
not change, so the full model, and every self-speculative decode, writes exactly the same tokens;
only how often an exit agrees with it moves. The hidden states after each exit layer are computed
once (the backbone is frozen); training then touches one exit module at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from mmexit.errors import RecipeError


@dataclass
class ExitStates:
    """Teacher-forced states of N caption positions: hidden [num_internal_exits, N, width] after each
    internal exit's layer, and targets [N]: the full model's next token there."""

    hidden: Tensor
    targets: Tensor


@torch.inference_mode()
def exit_states(model, features: Tensor, captions: list[list[int]], bos_id: int, pad_id: int,
                batch_size: int = 32) -> ExitStates:
    """Teacher-force ``captions`` (the full model's greedy tokens for features [B, patches, width],
    EOS included when produced) and keep every internal exit's hidden state at each position that
    predicts a caption token: inputs [BOS, t1 .. t(n-1)], targets [t1 .. tn]."""
    hidden_parts: list[Tensor] = []
    target_parts: list[Tensor] = []
    internal = model.exits[:-1]
    for start in range(0, len(captions), batch_size):
        rows = captions[start:start + batch_size]
        length = max(len(row) for row in rows)
        inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            inputs[i, :len(row)] = torch.tensor([bos_id, *row[:-1]])
            targets[i, :len(row)] = torch.tensor(row)
        batch = features[start:start + len(rows)]
        positions = torch.arange(length)
        hidden = model.embed(inputs.to(batch.device), positions.to(batch.device))
        prefix = model.adapter.prefix_length(batch)
        if prefix:
            hidden = torch.cat([batch.to(hidden.dtype), hidden], dim=1)
        valid = targets >= 0  # [b, length]
        per_exit = []
        for layer in range(1, internal[-1] + 1):
            hidden = model.adapter.layer(layer - 1, hidden, batch)
            if layer in internal:
                per_exit.append(hidden[:, prefix:][valid.to(hidden.device)].float().cpu())
        hidden_parts.append(torch.stack(per_exit))  # [exits, n, width]
        target_parts.append(targets[valid])
    return ExitStates(torch.cat(hidden_parts, dim=1), torch.cat(target_parts))


def _trainable_exit(model, exit_index: int) -> nn.Module:
    if model.exit_head not in ("adapter", "norm"):
        raise RecipeError(f"model.exit_head: {model.exit_head!r} exits have no parameters of their own to distil "
                          "(need 'adapter' or 'norm')")
    return model.exit_modules[exit_index]


@torch.no_grad()
def _share_agreeing(scores: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor,
                    batch_size: int = 4096) -> float:
    """The share of positions whose argmax of ``scores(hidden)`` equals ``targets``; hidden [N, width],
    targets [N] (in the scores' index space), in chunks of ``batch_size``."""
    hits = sum(int((scores(hidden[start:start + batch_size]).argmax(-1) == targets[start:start + batch_size]).sum())
               for start in range(0, targets.numel(), batch_size))
    return hits / max(1, targets.numel())


def agreement(model, states: ExitStates, batch_size: int = 4096) -> list[float]:
    """Per internal exit: the share of positions where its greedy token equals the full model's."""
    return [_share_agreeing(lambda hidden, e=exit_index: model.exit_logits(e, hidden), states.hidden[exit_index],
                            states.targets, batch_size) for exit_index in range(states.hidden.shape[0])]


@dataclass
class DistillLog:
    """Per internal exit: held-out agreement before and after each epoch (index 0 = before)."""

    held_out: list[list[float]] = field(default_factory=list)
    kept_epoch: list[int] = field(default_factory=list)


def distill_exits(model, train: ExitStates, held_out: ExitStates, epochs: int = 4, lr: float = 3e-4,
                  batch_size: int = 256, seed: int = 0, exits: Optional[list[int]] = None) -> DistillLog:
    """Train each internal exit's module (in place) by cross-entropy toward the full model's tokens
    over the heads' tokens; after every epoch its held-out agreement is measured and the best state
    (the one before training included) is kept. exits: internal exit indices (default: all)."""
    head_ids = model.head_ids
    classes = head_ids if head_ids is not None else torch.arange(model.vocab_size)
    lookup = torch.full((model.vocab_size,), -1, dtype=torch.long)
    lookup[classes] = torch.arange(classes.numel())
    train_targets, held_targets = lookup[train.targets], lookup[held_out.targets]
    if (train_targets < 0).any():
        raise ValueError("a target token is outside the heads' tokens")
    head = model.adapter.decoder.lm_head
    with torch.no_grad():
        weight = head.weight.index_select(0, classes).float()
        bias = None if head.bias is None else head.bias.index_select(0, classes).float()
    generator = torch.Generator().manual_seed(seed)
    log = DistillLog()
    for exit_index in (exits if exits is not None else range(train.hidden.shape[0])):
        module = _trainable_exit(model, exit_index)

        def scores(hidden: Tensor) -> Tensor:
            normed = module(hidden) if model.exit_head == "norm" else model.adapter.final_norm(module(hidden))
            return nn.functional.linear(normed, weight, bias)

        def held_agreement() -> float:
            return _share_agreeing(scores, held_out.hidden[exit_index], held_targets)

        history = [held_agreement()]
        best_state, best_epoch = copy.deepcopy(module.state_dict()), 0
        optimiser = torch.optim.Adam(module.parameters(), lr=lr)
        for epoch in range(1, epochs + 1):
            order = torch.randperm(train_targets.numel(), generator=generator)
            for start in range(0, order.numel(), batch_size):
                index = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(scores(train.hidden[exit_index, index]), train_targets[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            history.append(held_agreement())
            if history[-1] > history[best_epoch]:
                best_state, best_epoch = copy.deepcopy(module.state_dict()), epoch
        module.load_state_dict(best_state)
        log.held_out.append(history)
        log.kept_epoch.append(best_epoch)
    return log
