"""The continuous caption engine of the server: every caption equals greedy decoding of its image alone,
however requests of several images arrive; the service offers it next to the batcher; bad images fail
only their own request."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmexit_testing import CAPTION_BOS as BOS, CAPTION_EOS as EOS, run_interleaved
from PIL import Image

from mmexit.data.coco import image_tensor
from mmexit.exits.confidence import MaxProbRule
from mmexit.inference.search import greedy_decode
from mmexit.models.captioner import build_captioner
from mmexit.serve.caption_engine import ContinuousCaptionEngine, continuous_captions_supported
from mmexit.serve.service import build_service

SIZE, MEAN, STD, MAX_LEN = 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 8


class WordTokenizer:
    bos_id, eos_id, pad_id = BOS, EOS, 0

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i not in (BOS, EOS, 0))


def fake_predictor(model, rule, decoding: str = "greedy", policy: str = "propagate") -> SimpleNamespace:
    """What the engine reads of a ``CaptionPredictor``: model, rule, tokenizer, recipe, device."""
    recipe = {"model": {"image_size": SIZE, "image_mean": list(MEAN), "image_std": list(STD)},
              "evaluate": {"max_len": MAX_LEN, "decoding": decoding, "policy": policy, "batch_size": 4}}
    return SimpleNamespace(task="captioning", model=model, rule=rule, processor=WordTokenizer(), recipe=recipe,
                           device=torch.device("cpu"), operating_point=rule.describe() if rule else "full",
                           run_dir="tiny")


@pytest.fixture(scope="module")
def setup(make_spec):
    torch.manual_seed(0)
    model = build_captioner(make_spec()).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(10)]
    return model, images


def alone(model, images, rule) -> list[tuple[list[int], list[int]]]:
    out = []
    with torch.inference_mode():
        for image in images:
            features = model.encode(image_tensor(image, SIZE, MEAN, STD)[None])
            result = greedy_decode(model, features, rule, MAX_LEN, BOS, EOS, "propagate")
            out.append((result.tokens[0], result.token_layers[0]))
    return out


@pytest.mark.parametrize("rule", [None, MaxProbRule(0.5)], ids=["full", "maxprob"])
@pytest.mark.parametrize("slots", [1, 3, 16])
def test_every_caption_equals_greedy_alone(setup, rule, slots):
    model, images = setup
    reference = alone(model, images, rule)
    if rule is not None:
        assert len({layer for _, layers in reference for layer in layers}) >= 2, "rows must leave at several exits"
    engine = ContinuousCaptionEngine(fake_predictor(model, rule), slots=slots, calls_per_step=3).start()
    answers = run_interleaved(engine, images, random.Random(slots), max_rows=4)
    for row, output in enumerate(answers):
        tokens, layers = reference[row]
        assert (output["tokens"], output["layers"]) == (tokens, layers), f"image {row}"
        assert output["caption"] == WordTokenizer().decode(tokens)
    assert engine.stop(drain=True, timeout=10)
    assert engine.depth == 0 and not engine.owners


def test_the_service_offers_it_next_to_the_batcher(setup):
    model, _ = setup
    service = build_service(fake_predictor(model, MaxProbRule(0.5)), engine="continuous", max_batch=4)
    assert list(service.engines) == ["caption", "continuous"] and service.default == "caption"
    beam = build_service(fake_predictor(model, MaxProbRule(0.5), decoding="beam"), engine="continuous")
    assert list(beam.engines) == ["caption"]
    assert continuous_captions_supported(fake_predictor(model, None, policy="deferred").recipe) == (
        "evaluate.policy is 'deferred' (the continuous decoder supports 'propagate' only)")
    with pytest.raises(ValueError, match="cannot serve this run: evaluate.decoding is 'beam'"):
        ContinuousCaptionEngine(fake_predictor(model, None, decoding="beam"))


def test_an_unreadable_image_fails_its_request_only(setup):
    model, images = setup
    engine = ContinuousCaptionEngine(fake_predictor(model, MaxProbRule(0.5)), slots=2).start()
    good = engine.submit(images[:3])
    bad = engine.submit(["/no/such/image.png"])
    after = engine.submit(images[3:5])
    with pytest.raises(Exception, match="image file does not exist"):
        bad.result(timeout=60)
    assert len(good.result(timeout=60)) == 3 and len(after.result(timeout=60)) == 2
    assert engine.stop(drain=True, timeout=10)
