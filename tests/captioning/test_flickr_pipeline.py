"""The Flickr8k recipe end to end on a slice of the real photos: frozen DINOv2-S (cached features),
a small decoder, calibration on dev, every rule, test metrics; a second run reads the cache only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmexit.data.feature_cache import FeatureCache
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.runner import run_validated

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "flickr8k" / "dinov2-s_gpt2-6l.yaml"
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
SLICE = [
    f"data.flickr.root={FLICKR8K}", "data.max_train_images=48", "data.max_calib_images=12",
    "data.max_test_images=12", "model.decoder.config.n_layer=2", "model.decoder.config.n_embd=64",
    "model.decoder.config.n_head=2", "tokenizer.min_frequency=1", "train.epochs=2", "train.batch_size=32",
    "evaluate.max_len=12", "evaluate.metrics=[Bleu_4, METEOR, CIDEr]", "evaluate.timing_batch_sizes=[4, 1]",
    "evaluate.timing_repeats=1", "evaluate.timing_images=8", "evaluate.examples=2",
    "evaluate.rules=[{name: maxprob, sweep: [0.3, 0.9]}, {name: beem, calibration: {name: beem}, sweep: [0.0]}, "
    "{name: pcee, calibration: {name: pcee}, sweep: [0.9]}, {name: saturation, sweep: [0.9]}]",
]

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/data/flickr8k is absent (research data)")]


def test_flickr8k_recipe_on_a_slice(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="converting pypi:dinov2-small needs onnx (in the dev extra)")
    cache = tmp_path / "cache"
    recipe = validate_recipe(load_recipe(RECIPE, [*SLICE, f"data.cache_dir={cache}",
                                                  f"run.output_dir={tmp_path / 'out'}"]))
    rows = run_validated(recipe)
    out = tmp_path / "out"
    for name in ("results.json", "results.md", "speed_accuracy.png", "calibration.json", "model/tokenizer.json",
                 "predictions/full_test.json", "examples.md"):
        assert (out / name).is_file(), name
    test_rows = [r for r in rows if r["split"] == "test"]
    assert {r["method"] for r in test_rows} >= {"full", "maxprob", "beem", "pcee", "saturation"}
    assert all({"Bleu_4", "METEOR", "CIDEr"} <= set(r["metrics"]) for r in test_rows)
    assert all(r["metrics"]["distinct_captions"] >= 1 for r in test_rows)
    # mmexit predict --plot: the photos with the full model's and the rule's captions, coloured by exit layer
    from mmexit.runner import main

    photos = [str(FLICKR8K / "Flicker8k_Dataset" / json.loads(line)["image"])
              for line in (out / "predictions_test.jsonl").read_text().splitlines()[:3]]
    picture = tmp_path / "picture.png"
    args = ["predict", str(out), "--rule", "maxprob@0.3", "--output", str(tmp_path / "p.jsonl"), "--plot", str(picture)]
    assert main(args + [arg for photo in photos for arg in ("--image", photo)]) == 0
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"
    # a plot draws at most PLOT_MAX_PHOTOS and says so; a plot that cannot be written loses no caption
    from mmexit.serve import predict_cli

    monkeypatch.setattr(predict_cli, "PLOT_MAX_PHOTOS", 2)
    capsys.readouterr()
    blocked = tmp_path / "p.jsonl" / "picture.png"  # under a file: cannot be written
    for plot, code in ((picture, 0), (blocked, 2)):
        (tmp_path / "p.jsonl").unlink()
        assert main(args[:-1] + [str(plot)] + [arg for photo in photos for arg in ("--image", photo)]) == code
        assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
    err = capsys.readouterr().err
    assert err.count("--plot draws the first 2 of 3 photos") == 2
    assert f"mmexit: error: --plot: cannot write {blocked}" in err
    # tools/exit_losses.py: each exit's teacher-forced loss on train and dev photos (cached features)
    spec = importlib.util.spec_from_file_location("exit_losses", REPO / "tools" / "exit_losses.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    assert tool.main([str(out), "--splits", "train", "calib", "--images", "12"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in table[1:]] == ["train", "calib"]
    losses = [float(cell) for row in table[1:] for cell in row[3:]]
    assert len(losses) == 2 * 2 and all(0 < loss < 20 for loss in losses)  # 2 splits x 2 exits
    # tools/beam_settings.py: the full model's dev scores per beam size and length penalty
    spec = importlib.util.spec_from_file_location("beam_settings", REPO / "tools" / "beam_settings.py")
    beams = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(beams)
    capsys.readouterr()
    assert beams.main([str(out), "--beams", "2", "--penalties", "0", "1", "--no-repeat", "0", "2",
                       "--images", "6"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [tuple(cell.strip() for cell in row[:3]) for row in table[1:]] == [
        ("2", "0", "0"), ("2", "0", "2"), ("2", "1", "0"), ("2", "1", "2")]
    assert all(0 <= float(row[3]) <= 1 and 1 <= int(row[7]) <= 6 for row in table[1:])  # BLEU-4; distinct of 6
    entries = list((cache / "features").rglob("*.pt"))
    assert len(entries) == 48 + 12 + 12  # every photo of the slice encoded once, unpooled

    # a later run (another decoder) reads every feature from the cache: the encoder is never called
    def refuse(self, paths, compute, batch_size=32, progress=True):
        return original(self, paths, lambda chunk: pytest.fail(f"{len(chunk)} photos encoded again"),
                        batch_size, progress)

    original = FeatureCache.features
    monkeypatch.setattr(FeatureCache, "features", refuse)
    again = validate_recipe(load_recipe(RECIPE, [*SLICE, f"data.cache_dir={cache}", "model.decoder.config.n_layer=1",
                                                 "evaluate.rules=[{name: maxprob, sweep: [0.5]}]",
                                                 f"run.output_dir={tmp_path / 'out2'}"]))
    assert run_validated(again)
    predictions = json.loads((tmp_path / "out2" / "predictions" / "full_test.json").read_text())
    assert len(predictions) == 12

    # tools/distill_exits.py on a train-only run with per-exit adapters: a new run folder whose full
    # model decodes as the source's, its recipe pointed at it (calibrate -> evaluate -> report)
    adapters = validate_recipe(load_recipe(RECIPE, [*SLICE, f"data.cache_dir={cache}", "model.exit_head=adapter",
                                                    "run.stages=[train]", f"run.output_dir={tmp_path / 'out3'}"]))
    run_validated(adapters)
    spec = importlib.util.spec_from_file_location("distill_exits", REPO / "tools" / "distill_exits.py")
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    capsys.readouterr()
    distilled = tmp_path / "distilled"
    assert distill.main([str(tmp_path / "out3"), str(distilled), "--images", "24", "--held-out", "6",
                         "--epochs", "2"]) == 0
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in table[1:]] == ["1"]  # the one internal exit of the 2-layer decoder
    report = json.loads((distilled / "distill_exits.json").read_text())
    assert report["images"] == 24 and len(report["held_out_agreement"][0]) == 3  # before + 2 epochs
    moved = load_recipe(distilled / "recipe.yaml", [])
    assert moved["run"]["output_dir"] == str(distilled) and moved["run"]["stages"] == ["calibrate", "evaluate", "report"]
    import mmexit

    photos = [FLICKR8K / "Flicker8k_Dataset" / json.loads(line)["image"]
              for line in (out / "predictions_test.jsonl").read_text().splitlines()[:4]]
    before = mmexit.load(tmp_path / "out3", rule="full", device="cpu").caption(photos)
    after = mmexit.load(distilled, rule="full", device="cpu").caption(photos)
    assert [r["caption"] for r in after] == [r["caption"] for r in before]
    assert distill.main([str(tmp_path / "out3"), str(distilled)]) == 2  # never over an existing folder
