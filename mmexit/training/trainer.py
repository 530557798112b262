"""The one training loop, for every task: an exit loss through the wrapped model, under accelerate.

- The loss always calls the model accelerate prepared (DDP-wrapped on several processes), never
  ``unwrap_model(model).something(...)``, so gradients are synchronised.
- Steps are optimiser steps over the *global* batch: the step total is computed from the data
  loader accelerate prepared (which shards batches over processes), and the learning-rate
  schedule advances once per optimiser step, however many processes run. One process with
  batch 2B and two processes with batch B therefore follow the same schedule over the same epochs.
- Gradient accumulation (``train.grad_accum``), clipping, warm-up then linear or cosine decay,
  logging every ``train.log_every`` steps, and a stop with one line on a non-finite loss.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmexit.errors import MMExitError
from mmexit.training.base import ExitLoss


class TrainingDiverged(MMExitError):
    """The loss or the gradients became non-finite: the run stops, no results are written."""


def set_trainable(model, trains: str) -> None:
    """Freeze what a loss does not train: "final" leaves internal exit heads frozen, "internal"
    trains only them, "all" everything. ``model.head_kind(name)`` tells heads from the backbone."""
    for name, parameter in model.named_parameters():
        kind = model.head_kind(name)
        if trains == "all":
            parameter.requires_grad_(True)
        elif trains == "final":
            parameter.requires_grad_(kind != "internal")
        elif trains == "internal":
            parameter.requires_grad_(kind == "internal")
        else:
            raise ValueError(f"unknown trains={trains}")


def parameter_groups(model, lr: float, head_lr: Optional[float], weight_decay: float) -> list[dict]:
    """AdamW groups: heads at ``head_lr`` (default ``lr``); no decay on biases and norms."""
    groups: dict[tuple[float, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rate = (head_lr or lr) if model.head_kind(name) is not None else lr
        groups.setdefault((rate, parameter.ndim < 2), []).append(parameter)
    return [{"params": params, "lr": rate, "weight_decay": 0.0 if skip else weight_decay}
            for (rate, skip), params in groups.items()]


def train_stage(
    model,
    loss_fn: ExitLoss,
    dataset,
    collate: Callable,
    accelerator: Accelerator,
    train: dict,
    epochs: float,
    lr: float,
    seed: int,
    stage_name: str = "train",
    batch_sampler: Optional[Iterable] = None,
) -> list[dict]:
    """Train ``model`` in place with ``loss_fn`` over ``dataset``; returns the logged rows.

    batch_sampler: batches of indices (e.g. length-grouped); default: a seeded shuffle into
    batches of ``train.batch_size``.
    """
    set_trainable(model, loss_fn.trains)
    if batch_sampler is None:
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=train["batch_size"], shuffle=True, generator=generator,
                            collate_fn=collate)
    else:
        loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate)
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, train.get("head_lr"), train["weight_decay"]))
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / train.get("grad_accum", 1)))  # per process = global steps
    total_steps = train.get("max_steps") or max(1, int(math.ceil(steps_per_epoch * epochs)))
    # not prepared by accelerate: a prepared scheduler steps once per process per optimiser step
    scheduler = get_scheduler(train.get("lr_schedule", "linear"), optimizer,
                              num_warmup_steps=int(train["warmup_ratio"] * total_steps),
                              num_training_steps=total_steps)
    wrapped.train()
    history: list[dict] = []
    step, epoch = 0, 0
    progress_bar = tqdm(total=total_steps, desc=stage_name, disable=not accelerator.is_local_main_process)
    while step < total_steps:
        loss_fn.start_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(wrapped):
                loss, logs = loss_fn(wrapped, batch, step / total_steps)
                check_finite(accelerator, loss, step + 1, stage_name)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train["max_grad_norm"]:
                    norm = accelerator.clip_grad_norm_(wrapped.parameters(), train["max_grad_norm"])
                    check_finite(accelerator, norm, step + 1, stage_name, "gradient norm")
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            progress_bar.update(1)
            logs = {"loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0], **logs}
            if step % train["log_every"] == 0 or step == total_steps or step == 1:
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log({f"{stage_name}/{key}": value for key, value in logs.items()}, step=step)
                history.append({"stage": stage_name, "step": step, "epoch": epoch, **logs})
            if step >= total_steps:
                break
        epoch += 1
    progress_bar.close()
    accelerator.wait_for_everyone()
    set_trainable(model, "all")
    model.eval()
    return history


def check_finite(accelerator: Accelerator, value: torch.Tensor, step: int, stage: str, what: str = "loss") -> None:
    """Stop every process with one line when ``value`` is NaN or infinite on any of them."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad) > 0:
        raise TrainingDiverged(
            f"train: the {what} became non-finite at step {step} ({stage}); the run stopped and wrote no "
            "results (lower train.lr / train.head_lr, or check the data)")
