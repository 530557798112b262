"""Inference precision (``evaluate.dtype``, ``mmexit predict --dtype``): recipe checks, bf16 / int8 close to
float32 on tiny random encoders, never-exit at bf16 == the bf16 full model, and a tiny run end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mmexit_testing import make_glue, one_torch_thread, random_batch, tiny_model, tiny_recipe
from mmexit.errors import RecipeError
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.inference.encoder import early_exit_forward
from mmexit.models.precision import DTYPES, apply_precision, check_dtype, precision_of
from mmexit.recipe.loading import load_recipe
from mmexit.recipe.tasks import validate_recipe
from mmexit.runner import main

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _error(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if "mmexit: error:" in line]
    assert len(lines) == 1, stderr
    return lines[0][lines[0].index("mmexit: error:"):]


def test_recipe_dtype_validates_and_a_bad_value_names_key_and_allowed(tmp_path):
    recipe = tiny_recipe(tmp_path, tmp_path)
    assert validate_recipe(load_recipe(recipe, []))["evaluate"]["dtype"] == "float32"
    for name in DTYPES:
        assert validate_recipe(load_recipe(recipe, [f"evaluate.dtype={name}"]))["evaluate"]["dtype"] == name
    with pytest.raises(RecipeError) as error:
        validate_recipe(load_recipe(recipe, ["evaluate.dtype=fp8"]))
    message = str(error.value)
    assert "\n" not in message and message.startswith("evaluate.dtype: 'fp8' is not allowed")
    assert "allowed: float32, bfloat16, float16, int8" in message


def test_float16_on_cpu_and_int8_on_gpu_are_refused_with_one_line():
    with pytest.raises(RecipeError, match=r"^evaluate.dtype: float16 needs a GPU \(device is cpu\)"):
        check_dtype("float16", "cpu")
    with pytest.raises(RecipeError, match=r"^--dtype: int8 .* runs on CPU only \(device is cuda\)"):
        check_dtype("int8", "cuda", "--dtype")
    check_dtype("bfloat16", "cpu")
    check_dtype("float16", "cuda")


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.03), ("int8", 0.03)])
def test_lower_precision_outputs_are_close_to_float32(dtype, tolerance):
    model = tiny_model(num_labels=3)
    ids, mask = random_batch(batch=32)
    with torch.inference_mode():
        reference = model.forward_exits(ids, mask)  # [exits, batch, labels]
    low = apply_precision(copy.deepcopy(model), dtype, "cpu")
    assert precision_of(low) == dtype
    if dtype == "int8":  # square and up-projections quantized; down-projections (FFN output, classifiers) float
        assert type(low.heads[0].dense).__module__.startswith("torch.ao.nn.quantized.dynamic")
        assert type(low.heads[0].classifier) is torch.nn.Linear
    with torch.inference_mode():
        outputs = low.forward_exits(ids, mask).float()
    assert (outputs - reference).abs().max() < tolerance * reference.abs().max()
    agree = (outputs.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree >= 0.9


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_never_exit_at_low_precision_equals_its_full_model(dtype):
    model = apply_precision(tiny_model(num_labels=3), dtype, "cpu")
    ids, mask = random_batch(batch=32)
    with torch.inference_mode():
        full = model.forward_full(ids, mask)
    output = early_exit_forward(model, NeverExitRule(), ids, mask)
    assert output.logits.dtype == full.dtype
    assert torch.equal(output.logits, full)
    assert int(output.layers_used.min()) == model.num_layers


def test_early_exit_at_bfloat16_equals_its_simulated_exits():
    from mmexit.inference.exit_loop import simulate_exits

    model = apply_precision(tiny_model(num_labels=3), "bfloat16", "cpu")
    ids, mask = random_batch(batch=32)
    rule = MaxProbRule(0.36)
    with torch.inference_mode():
        simulated = simulate_exits(rule, model.forward_exits(ids, mask))
    real = early_exit_forward(model, rule, ids, mask)
    assert 0 < int((real.exit_index < model.num_exits - 1).sum()) < 32, "test needs rows that exit and rows that do not"
    agree = (real.exit_index == simulated).float().mean()
    assert agree >= 0.9  # shrinking batches change bf16 rounding for a few borderline rows at most


def test_tiny_run_at_bfloat16_then_predict_with_dtype(tmp_path, capsys):
    glue = make_glue(tmp_path)
    recipe = tiny_recipe(tmp_path, glue)
    out = tmp_path / "out"
    assert main([str(recipe), "evaluate.dtype=bfloat16"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {row["dtype"] for row in rows} == {"bfloat16"}
    measured = [row for row in rows if not row["simulated"] and row["method"] != "full"]
    assert measured and all(0.0 <= row["exits_changed"] <= 1.0 and "float32_point" in row for row in measured)
    assert "| dtype |" in (out / "results.md").read_text()
    capsys.readouterr()

    answers = {}
    for dtype in (None, "float32", "bfloat16", "int8"):
        args = ["predict", str(out), "--text", "good film number 3", "--text", "bad film number 4", "--rule", "full"]
        assert main(args + (["--dtype", dtype] if dtype else [])) == 0
        answers[dtype] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answers[None] == answers["bfloat16"]  # default: the run's evaluate.dtype
    for dtype in ("bfloat16", "int8"):
        for low, high in zip(answers[dtype], answers["float32"]):
            assert abs(low["probabilities"][0] - high["probabilities"][0]) < 0.05

    assert main(["predict", str(out), "--text", "x", "--dtype", "float16"]) == 2
    assert _error(capsys.readouterr().err) == ("mmexit: error: dtype: float16 needs a GPU (device is cpu); "
                                              "on CPU use bfloat16 or int8")
    assert main(["predict", str(out), "--text", "x", "--dtype", "half"]) == 2
    assert "allowed: float32, bfloat16, float16, int8" in _error(capsys.readouterr().err)
    assert main(["serve", str(out), "--port", "0", "--dtype", "float16"]) == 2  # refused before listening
    assert _error(capsys.readouterr().err).startswith("mmexit: error: dtype: float16 needs a GPU")


def test_run_with_float16_on_cpu_stops_before_writing(tmp_path, capsys):
    glue = make_glue(tmp_path)
    recipe = tiny_recipe(tmp_path, glue)
    assert main([str(recipe), "evaluate.dtype=float16"]) == 2
    assert _error(capsys.readouterr().err).startswith("mmexit: error: evaluate.dtype: float16 needs a GPU")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_one_process_runs_recipes_of_different_training_precision(tmp_path):
    """accelerate keeps a process's first precision; a second recipe with another one still builds."""
    from mmexit.runner import make_accelerator

    for precision in ("no", "bf16", "no"):
        recipe = {"train": {"mixed_precision": precision}, "run": {"log_with": "none"}}
        assert make_accelerator(recipe, tmp_path).mixed_precision == precision
