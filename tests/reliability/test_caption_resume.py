"""Captioning training killed with SIGKILL mid-epoch and resumed trains the same captioner."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmexit_testing import REPO
from mmexit.runner import main

FAULT = Path(__file__).with_name("fault_run.py")
RECIPE = REPO / "recipes" / "caption_quickstart.yaml"
TINY = [
    "data.scenes.num_train=48", "data.scenes.num_val=8", "data.scenes.num_test=8", "data.scenes.image_size=32",
    "model.image_size=32", "model.encoder.kwargs.img_size=32", "model.encoder.kwargs.depth=1",
    "model.decoder.config.n_layer=2", "model.decoder.config.n_embd=32", "model.decoder.config.n_head=2",
    "train.epochs=2", "train.batch_size=64", "run.stages=[train]", "run.log_with=none", "run.num_threads=1",
]


def test_caption_training_resumes_exactly(tmp_path):
    common = [*TINY, f"data.root={tmp_path / 'scenes'}"]
    assert main([str(RECIPE), *common, f"run.output_dir={tmp_path / 'straight'}"]) == 0
    out = [*common, f"run.output_dir={tmp_path / 'out'}", "run.checkpoint_every=1"]
    killed = subprocess.run([sys.executable, str(FAULT), "kill_after_checkpoint:2", str(RECIPE), *out],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main([str(RECIPE), *out, "run.resume=true"]) == 0
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
