"""Captioning at inference precision (``evaluate.dtype``): the K/V-cached decoders run in bfloat16 and
int8, never-exit equals the full model at that precision, and every greedy token is the argmax (up to a
bfloat16 rounding tie) of the teacher-forced logits of the same model.

Bitwise cached == uncached does not hold in bfloat16: a cached step computes one position's K/V,
recomputation all positions at once, and the two matrix shapes round differently."""

from __future__ import annotations

import copy

import pytest
import torch

from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.inference.continuous_decoder import continuous_greedy_decode
from mmexit.inference.search import beam_decode, greedy_decode
from mmexit.models.precision import apply_precision

MAX_LEN = 12
BOS, EOS = 1, 2


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def low(request, tiny_captioner):
    model = apply_precision(copy.deepcopy(tiny_captioner), request.param, "cpu")
    torch.manual_seed(1)
    with torch.inference_mode():
        features = model.encode(torch.randn(6, 3, 32, 32))  # float32 images are cast by encode
    return request.param, model, features


def test_features_and_cache_follow_the_precision(low):
    dtype, model, features = low
    assert features.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    if dtype == "int8":
        assert type(model.projection).__module__.startswith("torch.ao.nn.quantized.dynamic")
        assert isinstance(model.decoder.lm_head, torch.nn.Linear)  # float_modules: its rows are read directly


def test_never_exit_equals_the_full_model_at_that_precision(low):
    _, model, features = low
    full = greedy_decode(model, features, None, MAX_LEN, BOS, EOS)
    never = greedy_decode(model, features, NeverExitRule(), MAX_LEN, BOS, EOS)
    assert never.tokens == full.tokens
    assert int(never.layers.min()) == model.num_layers
    continuous = continuous_greedy_decode(model, features, NeverExitRule(), MAX_LEN, BOS, EOS, slots=4)
    assert len(continuous.tokens) == len(full.tokens)
    beam = beam_decode(model, features, None, 3, MAX_LEN, BOS, EOS)
    assert len(beam.tokens) == features.shape[0]


def test_cached_greedy_tokens_are_the_teacher_forced_argmax(low):
    """The cached decoder's tokens, fed back teacher-forced through every layer, are each step's best
    token up to a rounding tie: the K/V cache is right at this precision."""
    dtype, model, features = low
    result = greedy_decode(model, features, None, MAX_LEN, BOS, EOS)
    for row, tokens in enumerate(result.tokens):
        ids = torch.tensor([[BOS, *tokens[:-1]]])
        with torch.inference_mode():
            logits = model.forward_exits(features[row:row + 1], ids)[-1, 0].float()  # [steps, vocab]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gap = logits.max(-1).values - chosen  # 0 where the cached token is the argmax
        assert float(gap.max()) <= 0.02 * float(logits.abs().max()), (dtype, row, gap)


def test_early_exit_decoding_runs_and_exits(low):
    _, model, features = low
    result = greedy_decode(model, features, MaxProbRule(0.3), MAX_LEN, BOS, EOS, policy="deferred")
    assert int(result.layers.min()) < model.num_layers


def test_caption_run_at_bfloat16_end_to_end(tmp_path):
    """A reduced caption quickstart with evaluate.dtype=bfloat16: calibration and evaluation at bf16,
    rows say so, and mmexit.load(run) captions at the run's dtype like the run's own predictions."""
    import json

    import mmexit
    from mmexit.recipe.loading import load_recipe
    from mmexit.recipe.tasks import validate_recipe
    from mmexit.runner import run_validated
    from test_pipeline import QUICKSTART, TINY

    out = tmp_path / "out"
    recipe = validate_recipe(load_recipe(QUICKSTART, [*TINY, f"data.root={tmp_path / 'scenes'}",
                                                      f"run.output_dir={out}", "evaluate.dtype=bfloat16"]))
    rows = run_validated(recipe)
    assert rows and {row["dtype"] for row in rows} == {"bfloat16"}
    lines = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    key = json.loads((out / "operating_points.json").read_text())["default"]
    predictor = mmexit.load(out, device="cpu")
    assert predictor.describe()["dtype"] == "bfloat16"
    images = [out.parent / "scenes" / "images" / "test" / line["image"] for line in lines]
    results = predictor.caption(images, batch_size=recipe["evaluate"]["batch_size"])
    assert [r["caption"] for r in results] == [line[key]["caption"] for line in lines]
