"""Reliability: divergence stops the run, kill -9 + resume trains the same model, SIGTERM checkpoints,
an interrupted run never leaves a folder mixing two runs, and every bad input is one line, exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmexit_testing import REPO, make_glue, tiny_recipe
from mmexit.runner import main

FAULT = Path(__file__).with_name("fault_run.py")
TRAIN = ["train.epochs=3"]  # 16 samples, batch 8: 2 steps an epoch, 6 in all


def _error(stderr: str) -> str:
    """The one mmexit error line in stderr (progress bars share the stream, with carriage returns)."""
    import re

    lines = [part[part.index("mmexit: error:"):] for part in re.split(r"[\r\n]", stderr) if "mmexit: error:" in part]
    assert len(lines) == 1, stderr
    return lines[0].strip()


def _fault(mode: str, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAULT), mode, str(recipe), *overrides], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def _visible(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _outcome(out: Path) -> tuple:
    weights = load_file(str(out / "model" / "model.safetensors"))
    losses = [row["loss"] for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]
    return (weights, losses, (out / "predictions_test.jsonl").read_text(),
            [r["metrics"] for r in json.loads((out / "results.json").read_text())["rows"]])


def _same(a: tuple, b: tuple) -> bool:
    import torch

    return (all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1] == b[1] and a[2] == b[2] and a[3] == b[3])


@pytest.fixture()
def glue(tmp_path: Path) -> Path:
    return make_glue(tmp_path)


def test_divergence_stops_the_run_with_one_line(tmp_path, glue, capsys):
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe), "train.lr=1.0e+10", "train.head_lr=1.0e+10"]) == 2
    err = _error(capsys.readouterr().err)
    assert err.startswith("mmexit: error: train: the ") and "non-finite at step" in err
    assert _visible(tmp_path / "out") == {}  # nothing published: no model, no results


@pytest.mark.parametrize("checkpoint", [3, 4])  # the 3rd is at an epoch's end, the 4th mid-epoch
def test_kill_during_training_then_resume_equals_an_uninterrupted_run(tmp_path, glue, checkpoint):
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe), *TRAIN, "run.output_dir=" + str(tmp_path / "straight")]) == 0
    killed = _fault(f"kill_after_checkpoint:{checkpoint}", recipe, *TRAIN, "run.checkpoint_every=1")
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "out"
    assert _visible(out).keys() <= {p for p in _visible(out) if p.startswith("checkpoints/")}
    assert main([str(recipe), *TRAIN, "run.checkpoint_every=1", "run.resume=true"]) == 0
    assert _same(_outcome(out), _outcome(tmp_path / "straight"))
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert set(manifest["files"].values()) == {manifest["run_id"]}


def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path, glue):
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe), *TRAIN, "run.output_dir=" + str(tmp_path / "straight")]) == 0
    stopped = _fault("term_after_step:3", recipe, *TRAIN, "run.checkpoint_every=100")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert _error(stopped.stderr).startswith("mmexit: error: train: stopped by SIGTERM at step 3")
    assert any((tmp_path / "out" / "checkpoints").iterdir())
    assert main([str(recipe), *TRAIN, "run.checkpoint_every=100", "run.resume=auto"]) == 0
    assert _same(_outcome(tmp_path / "out"), _outcome(tmp_path / "straight"))


def test_resume_true_without_checkpoint_is_one_line(tmp_path, glue, capsys):
    assert main([str(tiny_recipe(tmp_path, glue)), "run.resume=true"]) == 2
    assert "run.resume: no complete checkpoint in" in capsys.readouterr().err


def test_a_killed_overwrite_leaves_the_earlier_run_whole(tmp_path, glue):
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe)]) == 0
    before = _visible(tmp_path / "out")
    killed = _fault("kill_in_evaluate", recipe, "run.overwrite=true", "run.seed=1")
    assert killed.returncode == -signal.SIGKILL
    assert _visible(tmp_path / "out") == before  # the seed-0 run, untouched (staging is hidden)
    assert main([str(recipe), "run.overwrite=true", "run.seed=1"]) == 0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # stale staging cleaned
    manifest = json.loads((tmp_path / "out" / "run_manifest.json").read_text())
    assert "seed: 1" in (tmp_path / "out" / "recipe.yaml").read_text() and len(set(manifest["files"].values())) == 1


def test_a_train_only_rerun_drops_the_stale_results(tmp_path, glue):
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe)]) == 0
    assert main([str(recipe), "run.overwrite=true", "run.stages=[train]", "run.seed=2"]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "results.json" not in names and "calibration.json" not in names and "model" in names
    # an evaluate-only run keeps the model it evaluated and names its run in the manifest
    assert main([str(recipe), "run.overwrite=true", "run.stages=[calibrate,evaluate,report]"]) == 0
    files = json.loads((tmp_path / "out" / "run_manifest.json").read_text())["files"]
    assert files["model"] != files["results.json"]


@pytest.mark.parametrize("extra, expected", [
    (["data.max_train_samples=-5"], "data.max_train_samples: must be > 0 (or null for all), got -5"),
    (["data.max_eval_samples=0"], "data.max_eval_samples: must be > 0 (or null for all), got 0"),
    (["evaluate.timing_batch_sizes=[]"], "evaluate.timing_batch_sizes: expected a non-empty list of positive batch sizes"),
    (["evaluate.rules=[]"], "evaluate.rules: expected a non-empty list"),
    (["run.resume=maybe"], "run.resume: 'maybe' is not allowed; allowed: true, false, auto"),
    (["run.stages=[evaluate]"], "run.stages: no trained model in"),
])
def test_bad_values_are_one_line_and_write_nothing(tmp_path, glue, capsys, extra, expected):
    assert main([str(tiny_recipe(tmp_path, glue)), *extra]) == 2
    err = _error(capsys.readouterr().err)
    assert err.startswith(f"mmexit: error: {expected}"), err
    assert _visible(tmp_path / "out") == {} if (tmp_path / "out").exists() else True


def test_lr_written_as_yaml_1_1_float_is_accepted(tmp_path, glue):
    from mmexit.recipe import load_recipe, validate_recipe

    path = tiny_recipe(tmp_path, glue)
    path.write_text(path.read_text().replace("train: {epochs: 1,", "train: {lr: 1e-5, epochs: 1,"))
    recipe = validate_recipe(load_recipe(path))
    assert recipe["train"]["lr"] == 1e-5


def test_bad_data_files_are_one_line(tmp_path, glue, capsys):
    recipe = tiny_recipe(tmp_path, glue)
    dev = glue / "SST-2" / "dev.tsv"
    dev.write_bytes(b"sentence\tlabel\nfine\t1\nbad \xff\xfe bytes\t0\n")
    assert main([str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == f"mmexit: error: {dev}:3: not valid UTF-8 (byte 0xff); save the file as UTF-8"
    dev.write_text("sentence\tlabel\n" + "x" * 200_000 + "\t1\n")
    assert main([str(recipe)]) == 2
    err = _error(capsys.readouterr().err)
    assert err.startswith(f"mmexit: error: {dev}:2: field larger than field limit")


def test_output_folder_that_cannot_be_written(tmp_path, glue, capsys):
    recipe = tiny_recipe(tmp_path, glue)
    (tmp_path / "a_file").write_text("x")
    assert main([str(recipe), f"run.output_dir={tmp_path / 'a_file'}"]) == 2
    assert capsys.readouterr().err.strip() == f"mmexit: error: run.output_dir: {tmp_path / 'a_file'} exists and is not a folder"
    assert main([str(recipe), "run.output_dir=/proc/mmexit-cannot-write"]) == 2
    assert "mmexit: error: run.output_dir: cannot write into /proc/mmexit-cannot-write" in capsys.readouterr().err


def test_too_little_disk_for_the_model(tmp_path, glue, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main([str(tiny_recipe(tmp_path, glue))]) == 2
    err = _error(capsys.readouterr().err)
    assert err.startswith("mmexit: error: run.output_dir: 0 MiB free on the disk of") and "the model needs about" in err
    assert _visible(tmp_path / "out") == {}
