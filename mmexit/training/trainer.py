"""The one training loop, for every task: an exit loss through the wrapped model, under accelerate.

- The loss always calls the model accelerate prepared (DDP-wrapped on several processes), never
  ``unwrap_model(model).something(...)``, so gradients are synchronised.
- Steps are optimiser steps over the *global* batch: the step total is computed from the data
  loader accelerate prepared (which shards batches over processes), and the learning-rate
  schedule advances once per optimiser step, however many processes run. One process with
  batch 2B and two processes with batch B therefore follow the same schedule over the same epochs.
- Gradient accumulation (``train.grad_accum``), clipping, warm-up then linear or cosine decay,
  logging every ``train.log_every`` steps, and a stop with one line on a non-finite loss.
- Checkpoints every ``run.checkpoint_every`` steps and at each epoch end, resume from the newest
  (``mmexit.training.checkpoints``), and on SIGTERM (a cluster's preemption) a checkpoint, then a
  clean stop.
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
from mmexit.training.checkpoints import Checkpointing, load_checkpoint, read_state, restore_rng, save_checkpoint

_PREEMPTED = {"flag": False}


class TrainingDiverged(MMExitError):
    """The loss or the gradients became non-finite: the run stops, no results are written."""


class Preempted(MMExitError):
    """SIGTERM arrived during training: a checkpoint was saved, the run stops (exit 143)."""

    exit_code = 143


def request_preemption(*_: object) -> None:
    """Signal handler: finish the current step, checkpoint, stop."""
    _PREEMPTED["flag"] = True


class ShuffledBatches:
    """Batches of indices in a seeded random order, a new order each epoch (every process draws
    the same; accelerate gives each its share). Iterating it once advances one epoch."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for start in range(0, self.size, self.batch_size):
            yield order[start:start + self.batch_size]


def set_trainable(model, trains: str) -> None:
    """Freeze what a loss does not train: "final" leaves internal exit heads frozen, "internal"
    trains only them, "all" everything. ``model.head_kind(name)`` tells heads ("internal",
    "final") from the backbone (None) and from parts that never train ("frozen")."""
    for name, parameter in model.named_parameters():
        kind = model.head_kind(name)
        if kind == "frozen":  # e.g. a frozen pretrained image encoder: never trained
            parameter.requires_grad_(False)
        elif trains == "all":
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
    checkpointing: Optional[Checkpointing] = None,
) -> list[dict]:
    """Train ``model`` in place with ``loss_fn`` over ``dataset``; returns the logged rows.

    batch_sampler: batches of indices (e.g. length-grouped), iterated once per epoch; default a
    seeded shuffle into batches of ``train.batch_size``. checkpointing: where to checkpoint and
    what to resume from (a checkpoint of a later stage skips this one).
    """
    order = checkpointing.stage_order(stage_name) if checkpointing else 0
    resume = checkpointing.resume_from if checkpointing else None
    resume_state = read_state(resume) if resume is not None else None
    if resume_state is not None and resume_state["stage_index"] > order:
        return []  # finished before the checkpoint; its weights come with the later stage's checkpoint
    set_trainable(model, loss_fn.trains)
    sampler = batch_sampler if batch_sampler is not None else ShuffledBatches(len(dataset), train["batch_size"], seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, train.get("head_lr"), train["weight_decay"]))
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / train.get("grad_accum", 1)))  # per process = global steps
    total_steps = train.get("max_steps") or max(1, int(math.ceil(steps_per_epoch * epochs)))
    # not prepared by accelerate: a prepared scheduler steps once per process per optimiser step
    scheduler = get_scheduler(train.get("lr_schedule", "linear"), optimizer,
                              num_warmup_steps=int(train["warmup_ratio"] * total_steps),
                              num_training_steps=total_steps)
    history: list[dict] = []
    step, epoch, skip, resumed = 0, 0, 0, None
    if resume_state is not None and resume_state["stage_index"] == order:
        progress = load_checkpoint(resume, accelerator, wrapped, optimizer, scheduler, loss_fn)
        step, epoch, skip, history = progress["step"], progress["epoch"], progress["batches_in_epoch"], progress["history"]
        resumed = resume
        for _ in range(epoch):  # the sampler draws one order per epoch: advance it past the epochs done
            for _ in sampler:
                pass
    wrapped.train()
    progress_bar = tqdm(total=total_steps, initial=step, desc=stage_name, disable=not accelerator.is_local_main_process)

    def checkpoint(batches_in_epoch: int, at_epoch: int) -> None:
        save_checkpoint(checkpointing, accelerator, wrapped, optimizer, scheduler, loss_fn, {
            "stage": stage_name, "stage_index": order, "step": step, "epoch": at_epoch,
            "batches_in_epoch": batches_in_epoch, "history": history, "total_steps": total_steps})

    while step < total_steps:
        if skip == 0:
            loss_fn.start_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        done_in_epoch = skip
        batches = _resumed_batches(epoch_loader, resumed, skip, accelerator) if resumed is not None else epoch_loader
        resumed = None
        for batch in batches:
            done_in_epoch += 1
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
            if checkpointing and checkpointing.every and step % checkpointing.every == 0:
                checkpoint(done_in_epoch, epoch)
            if _preemption_everywhere(accelerator):
                if checkpointing:
                    checkpoint(done_in_epoch, epoch)
                raise Preempted(f"train: stopped by SIGTERM at step {step} ({stage_name}); "
                                + ("checkpoint saved, rerun with run.resume=true to continue" if checkpointing
                                   else "no checkpoint (set run.checkpoint_every)"))
        else:
            epoch += 1
            skip = 0
            if checkpointing and step < total_steps:
                checkpoint(0, epoch)
            continue
        skip = 0
    if checkpointing:
        checkpoint(0, epoch + 1)  # the stage's end: a resume after it skips the stage
    progress_bar.close()
    accelerator.wait_for_everyone()
    set_trainable(model, "all")
    model.eval()
    return history


def _resumed_batches(loader, checkpoint, skip: int, accelerator):
    """The resumed epoch's batches with the random-number states of the checkpoint in force where the
    uninterrupted run had them: starting a data iterator draws a seed from the global generator, which
    that run did at the epoch's start (before the checkpoint when it was taken mid-epoch)."""
    if skip == 0:
        restore_rng(checkpoint, accelerator)
        yield from loader
        return
    batches = iter(loader)
    first = next(batches, None)  # the iterator starts (and draws its seed) here
    restore_rng(checkpoint, accelerator)
    if first is None:
        return
    yield first
    yield from batches


def _preemption_everywhere(accelerator: Accelerator) -> bool:
    """True on every process when any process received SIGTERM."""
    flag = torch.tensor([1.0 if _PREEMPTED["flag"] else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return float(flag) > 0


def check_finite(accelerator: Accelerator, value: torch.Tensor, step: int, stage: str, what: str = "loss") -> None:
    """Stop every process with one line when ``value`` is NaN or infinite on any of them."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if float(bad) > 0:
        raise TrainingDiverged(
            f"train: the {what} became non-finite at step {step} ({stage}); the run stopped and wrote no "
            "results (lower train.lr / train.head_lr, or check the data)")
