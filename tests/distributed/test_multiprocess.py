"""Multi-process training (torchrun, 2 CPU processes, gloo) trains the same model as one process.

One process with batch 2B and two processes with batch B see the same global batches: the same
number of optimiser steps, the same learning-rate schedule, and (DDP through the wrapped model)
weights identical on both ranks after every step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("train_steps.py")


def _run(task: str, out: Path, processes: int, batch_size: int) -> None:
    if processes == 1:
        command = [sys.executable, str(SCRIPT), task, str(out), str(batch_size)]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
        command = [torchrun, "--standalone", f"--nproc_per_node={processes}", str(SCRIPT), task, str(out),
                   str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("task", ["text", "caption"])
def test_two_processes_train_like_one(tmp_path, task):
    _run(task, tmp_path / "one", 1, 16)
    _run(task, tmp_path / "two", 2, 8)
    one = json.loads((tmp_path / "one" / "history0.json").read_text())
    two = json.loads((tmp_path / "two" / "history0.json").read_text())
    assert len(one) == len(two) > 2  # the same number of optimiser steps over 2 epochs
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert [round(r["lr"], 12) for r in one] == [round(r["lr"], 12) for r in two]
    assert one[-1]["lr"] == 0.0 and one[-1]["epoch"] == two[-1]["epoch"] == 1
    rank0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)  # DDP kept the ranks in sync
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    # both trainings moved the weights the same way (same data, same schedule; float sums differ slightly)
    drift = max(float((single[key] - rank0[key]).abs().max()) for key in rank0)
    assert drift < 0.05, drift
