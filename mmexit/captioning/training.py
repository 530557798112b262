"""Training the multi-exit captioner: joint weighted CE over exits (+ KL to the final exit), or two-stage.

- ``joint``: loss = sum_i w_i CE_i / sum_i w_i (+ kl_weight * mean_i<M KL(p_final || p_i), the final
  exit's distribution detached, at temperature ``kl_temperature``). Exit weights: ``depth``
  (w_i = exit layer, as BEEM's weights growing with depth), ``uniform``, or a list.
- ``two_stage``: first the backbone with the final exit only (CE), then the backbone frozen and
  only the per-exit modules trained (needs ``exit_head`` ``norm`` or ``adapter``; with ``shared``
  heads there is nothing left to train).

Captions are teacher-forced: input ``[bos] + ids``, target ``ids + [eos]``, right-padded; padding
targets are ignored (by length, so pad may equal eos as with GPT-2's tokenizer).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from mmexit.errors import RecipeError


@dataclass
class LossConfig:
    exit_weights: str | list = "depth"
    kl_weight: float = 0.0
    kl_temperature: float = 1.0


def batch_tensors(token_lists: list[list[int]], bos: int, eos: int, pad: int, max_length: int) -> tuple[Tensor, Tensor]:
    """Teacher-forcing inputs [B, T] and targets [B, T] (-100 where padded); captions cut at max_length."""
    cut = [ids[: max_length - 1] for ids in token_lists]
    length = max(len(ids) for ids in cut) + 1
    inputs = torch.full((len(cut), length), pad, dtype=torch.long)
    targets = torch.full((len(cut), length), -100, dtype=torch.long)
    for row, ids in enumerate(cut):
        inputs[row, : len(ids) + 1] = torch.tensor([bos] + ids)
        targets[row, : len(ids) + 1] = torch.tensor(ids + [eos])
    return inputs, targets


def exit_weights(spec, exits: list[int]) -> list[float]:
    if spec == "depth":
        return [float(layer) for layer in exits]
    if spec == "uniform":
        return [1.0] * len(exits)
    if isinstance(spec, (list, tuple)) and len(spec) == len(exits):
        return [float(w) for w in spec]
    raise RecipeError(f"train.loss.exit_weights: expected depth, uniform or a list of {len(exits)} numbers, got {spec!r}")


def multi_exit_loss(logits: list[Tensor], targets: Tensor, weights: list[float], kl_weight: float = 0.0,
                    kl_temperature: float = 1.0) -> Tensor:
    """Weighted CE over exits (logits: M x [B, T, V]; targets [B, T]) + optional KL(final || exit)."""
    mask = targets != -100
    total = sum(weights)
    loss = sum(w * F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=-100)
               for w, z in zip(weights, logits) if w) / total
    if kl_weight > 0 and len(logits) > 1:
        teacher = (logits[-1][mask].detach() / kl_temperature).log_softmax(-1)
        kl = sum(F.kl_div((z[mask] / kl_temperature).log_softmax(-1), teacher, log_target=True, reduction="batchmean")
                 for z in logits[:-1]) / (len(logits) - 1)
        loss = loss + kl_weight * kl_temperature ** 2 * kl
    return loss


def _run_epochs(model, parameters, images: Tensor, pairs: list[tuple[int, list[int]]], tokenizer, epochs: float,
                batch_size: int, lr: float, weight_decay: float, warmup_ratio: float, max_grad_norm: float,
                max_length: int, loss_fn, accelerator, seed: int, desc: str, log_every: int) -> list[float]:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = int(warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    model.train()
    bar = tqdm(range(total), desc=desc, disable=not accelerator.is_local_main_process, mininterval=5)
    for step in bar:
        if len(order) < batch_size:
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen, order = order[:batch_size], order[batch_size:]
        image_index = torch.tensor([pairs[i][0] for i in chosen])
        inputs, targets = batch_tensors([pairs[i][1] for i in chosen], tokenizer.bos_id, tokenizer.eos_id,
                                        tokenizer.pad_id, max_length)
        unwrapped = accelerator.unwrap_model(model)
        features = unwrapped.encode(images[image_index].to(device))
        logits = unwrapped.forward_exits(features, inputs.to(device))
        loss = loss_fn(logits, targets.to(device))
        accelerator.backward(loss)
        if max_grad_norm:
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{sum(history[-log_every:]) / len(history[-log_every:]):.3f}")
    model.eval()
    return history


def train_captioner(model, images: Tensor, captions: list[list[list[int]]], tokenizer, train_cfg: dict,
                    accelerator, seed: int = 0) -> dict:
    """Train on images [N, 3, S, S] with token-id captions per image (all (image, caption) pairs).

    Returns {"losses": [...], "stage2_losses": [...]} (per step).
    """
    pairs = [(i, ids) for i, per_image in enumerate(captions) for ids in per_image]
    loss_cfg = train_cfg["loss"]
    weights = exit_weights(loss_cfg["exit_weights"], model.exits)
    common = dict(batch_size=train_cfg["batch_size"], weight_decay=train_cfg["weight_decay"],
                  warmup_ratio=train_cfg["warmup_ratio"], max_grad_norm=train_cfg["max_grad_norm"],
                  max_length=train_cfg["max_length"], accelerator=accelerator, seed=seed,
                  log_every=train_cfg["log_every"])
    result = {"losses": [], "stage2_losses": []}
    if train_cfg["schedule"] == "joint":
        loss_fn = lambda z, y: multi_exit_loss(z, y, weights, loss_cfg["kl_weight"], loss_cfg["kl_temperature"])  # noqa: E731
        result["losses"] = _run_epochs(model, [p for p in model.parameters() if p.requires_grad], images, pairs,
                                       tokenizer, train_cfg["epochs"], lr=train_cfg["lr"], loss_fn=loss_fn,
                                       desc="train (joint)", **common)
        return result
    if model.exit_head == "shared":
        raise RecipeError("train.schedule: two_stage needs model.exit_head norm or adapter "
                          "(shared heads leave nothing to train in stage 2)")
    final_only = [0.0] * (len(weights) - 1) + [1.0]
    result["losses"] = _run_epochs(model, list(model.parameters()), images, pairs, tokenizer, train_cfg["epochs"],
                                   lr=train_cfg["lr"], loss_fn=lambda z, y: multi_exit_loss(z, y, final_only),
                                   desc="train (stage 1)", **common)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head_parameters = list(model.exit_modules.parameters())
    for parameter in head_parameters:
        parameter.requires_grad_(True)
    internal = weights[:-1] + [0.0]
    loss_fn = lambda z, y: multi_exit_loss(z, y, internal, loss_cfg["kl_weight"], loss_cfg["kl_temperature"])  # noqa: E731
    result["stage2_losses"] = _run_epochs(model, head_parameters, images, pairs, tokenizer,
                                          train_cfg.get("stage2_epochs") or train_cfg["epochs"],
                                          lr=train_cfg.get("stage2_lr") or train_cfg["lr"], loss_fn=loss_fn,
                                          desc="train (stage 2)", **common)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return result
