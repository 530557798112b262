"""The accelerate training loop for a multi-exit text classifier."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mmexit.data.examples import TextExample
from mmexit.data.text import Collator
from mmexit.models.encoder import MultiExitEncoder
from mmexit.training.base import ExitLoss


def set_trainable(model: MultiExitEncoder, trains: str) -> None:
    """Freeze what a loss does not train: "final" leaves internal heads frozen, "internal" all but them."""
    last = model.num_exits - 1
    for name, parameter in model.named_parameters():
        is_head = name.startswith("heads.")
        head_index = int(name.split(".")[1]) if is_head else None
        if trains == "all":
            parameter.requires_grad_(True)
        elif trains == "final":
            parameter.requires_grad_(not is_head or head_index == last)
        elif trains == "internal":
            parameter.requires_grad_(is_head and head_index != last)
        else:
            raise ValueError(f"unknown trains={trains}")


class LengthGroupedBatches:
    """Shuffled batches of similar length: less padding, so fewer wasted FLOPs per step.

    Each epoch: shuffle, cut into windows of ``window`` batches, sort each window by length, cut
    into batches, shuffle the batches. Lengths are character counts, a cheap proxy for tokens.
    """

    def __init__(self, examples: list[TextExample], batch_size: int, seed: int, window: int = 50) -> None:
        self.lengths = [len(e.text_a) + len(e.text_b or "") for e in examples]
        self.batch_size = batch_size
        self.window = window * batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start:start + self.window], key=lambda i: self.lengths[i])
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]


def train_stage(
    model: MultiExitEncoder,
    loss_fn: ExitLoss,
    examples: list[TextExample],
    tokenizer,
    accelerator: Accelerator,
    train: dict,
    max_length: int,
    epochs: float,
    lr: float,
    seed: int,
    stage_name: str = "train",
) -> list[dict]:
    """Train ``model`` in place with ``loss_fn``; returns the logged rows (step, loss, ...)."""
    set_trainable(model, loss_fn.trains)
    loader = DataLoader(examples, batch_sampler=LengthGroupedBatches(examples, train["batch_size"], seed),
                        collate_fn=Collator(tokenizer, max_length))
    head_lr = train["head_lr"] or lr
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rate = head_lr if name.startswith("heads.") else lr
        skip_decay = parameter.ndim < 2
        groups.setdefault((rate, skip_decay), []).append(parameter)
    parameter_groups = [
        {"params": params, "lr": rate, "weight_decay": 0.0 if skip else train["weight_decay"]}
        for (rate, skip), params in groups.items()
    ]
    optimizer = torch.optim.AdamW(parameter_groups)
    steps_per_epoch = math.ceil(len(loader) / train["grad_accum"])
    total_steps = train["max_steps"] or max(1, int(math.ceil(steps_per_epoch * epochs)))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train["warmup_ratio"] * total_steps), total_steps)
    wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    wrapped.train()
    history: list[dict] = []
    step = 0
    progress_bar = tqdm(total=total_steps, desc=stage_name, disable=not accelerator.is_local_main_process)
    epoch = 0
    while step < total_steps:
        loss_fn.start_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(wrapped):
                loss, logs = loss_fn(wrapped, batch, step / total_steps)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train["max_grad_norm"]:
                    accelerator.clip_grad_norm_(wrapped.parameters(), train["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress_bar.update(1)
            logs = {"loss": float(loss.detach()), **logs}
            if step % train["log_every"] == 0 or step == total_steps:
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
