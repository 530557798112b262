"""Checkpoints during training and resuming from them (``run.checkpoint_every``, ``run.resume``).

A checkpoint is a folder ``<output_dir>/checkpoints/<stage>-step-<N>/`` holding the model weights
(``model.safetensors``), the optimiser and scheduler state and the exit loss's own state
(``trainer.pt``), every process's random-number states (``rng-<rank>.pt``) and, written last,
``trainer_state.json`` (stage, step, epoch, batches done in the epoch, the logged history). It is
written into a hidden temporary folder and renamed when complete, so a kill at any moment leaves
either a complete checkpoint or none; incomplete ones are removed at the next start. The newest
``run.keep_checkpoints`` are kept.

Resuming restores all of it and skips the batches already done in the current epoch (the batch
samplers are seeded per run and advanced epoch by epoch), so a run killed and resumed trains the
same model as one that never stopped.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


@dataclass
class Checkpointing:
    """Where and how often to checkpoint, and the checkpoint to resume from (None: start fresh)."""

    folder: Path
    every: Optional[int] = None
    keep: int = 2
    resume_from: Optional[Path] = None
    stages: list[str] = field(default_factory=list)  # stage names in order, filled as stages start

    def stage_order(self, stage: str) -> int:
        if stage not in self.stages:
            self.stages.append(stage)
        return self.stages.index(stage)


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by stage order, then step)."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not (path / STATE_FILE).is_file():
            continue
        state = json.loads((path / STATE_FILE).read_text())
        found.append(((state["stage_index"], state["step"]), path))
    return [path for _, path in sorted(found)]


def clean_incomplete(folder: Path) -> None:
    """Remove temporary or incomplete checkpoint folders left by a killed run."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and (path.name.startswith(".") or not (path / STATE_FILE).is_file()):
            shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpointing: Checkpointing, accelerator, model, optimizer, scheduler, loss_fn,
                    progress: dict[str, Any]) -> Path:
    """Write a complete checkpoint atomically (every process writes its RNG state; main the rest)."""
    name = f"{progress['stage']}-step-{progress['step']:07d}"
    final = checkpointing.folder / name
    temporary = checkpointing.folder / f".{name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), temporary / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        weights = {k: v.detach().clone().contiguous().cpu()
                   for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_file(weights, str(temporary / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "loss": {k: v for k, v in vars(loss_fn).items() if not callable(v)}}, temporary / "trainer.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(progress))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in complete_checkpoints(checkpointing.folder)[:-max(checkpointing.keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, loss_fn) -> dict:
    """Restore a checkpoint into the prepared objects; returns its progress (step, epoch, ...)."""
    weights = load_file(str(path / "model.safetensors"))
    accelerator.unwrap_model(model).load_state_dict(weights)
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    for key, value in trainer["loss"].items():
        setattr(loss_fn, key, value)
    return read_state(path)


def restore_rng(path: Path, accelerator) -> None:
    """This process's random-number states as they were at the checkpoint. Called once the resumed
    epoch's data iterator exists: creating one draws a seed from the global generator, which the
    uninterrupted run did before the checkpoint."""
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
