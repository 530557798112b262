"""The captioning task through the runner: bad inputs fail before anything is written; a reduced quickstart end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mmexit.runner import run_validated
from mmexit.data.scenes import generate_scenes
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.errors import DataError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "caption_quickstart.yaml"
TINY = [
    "data.scenes.num_train=64", "data.scenes.num_val=12", "data.scenes.num_test=12", "data.scenes.image_size=32",
    "model.image_size=32", "model.encoder.kwargs.img_size=32", "model.encoder.kwargs.depth=1",
    "model.decoder.config.n_layer=3", "model.decoder.config.n_embd=32", "model.decoder.config.n_head=2",
    "train.epochs=1", "train.batch_size=32", "evaluate.max_len=10",
    "evaluate.rules=[{name: maxprob, sweep: [0.3, 0.9]}, {name: beem, calibration: {name: beem}, sweep: [0.0, 0.1]}]",
    "evaluate.metrics=[Bleu_4, ROUGE_L, CIDEr]", "evaluate.timing_batch_sizes=[4, 1]", "evaluate.timing_repeats=1",
    "evaluate.timing_images=8", "evaluate.sweep_max_images=12", "evaluate.oracle_sweep=false",
]


def _recipe(tmp_path: Path, *extra: str) -> dict:
    return validate_recipe(load_recipe(QUICKSTART, [*TINY, f"data.root={tmp_path / 'scenes'}",
                                                    f"run.output_dir={tmp_path / 'out'}", *extra]))


def _coco_layout(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "scenes"
    generate_scenes(root, 64, 12, 12, 32, 0)
    overrides = ["data.source=coco", f"data.annotations={{train: {root}/annotations/captions_train.json, "
                 f"val: {root}/annotations/captions_val.json, test: {root}/annotations/captions_test.json}}",
                 f"data.image_dirs={{train: {root}/images/train, val: {root}/images/val, test: {root}/images/test}}"]
    return root, overrides


def _assert_untouched(out: Path, before: dict) -> None:
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
    assert after == before


@pytest.mark.parametrize("damage", ["missing", "unreadable", "format", "no_captions"])
def test_bad_inputs_fail_before_writing(tmp_path, damage):
    root, overrides = _coco_layout(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    test_json = root / "annotations/captions_test.json"
    data = json.loads(test_json.read_text())
    victim = data["images"][3]
    if damage == "missing":
        (root / "images/test" / victim["file_name"]).unlink()
        expected = rf"image file does not exist: .*{victim['file_name']} \(image id {victim['id']}\)"
    elif damage == "unreadable":
        (root / "images/test" / victim["file_name"]).write_bytes(b"\x89PNG garbage")
        expected = rf"cannot read image .*{victim['file_name']} \(image id {victim['id']}\)"
    elif damage == "format":
        test_json.write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
        expected = r"captions_test.json: wrong format"
    else:
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != victim["id"]]
        test_json.write_text(json.dumps(data))
        expected = rf"image id {victim['id']} \(.*\) has no captions"
    recipe = _recipe(tmp_path, *overrides, "run.overwrite=true")
    with pytest.raises(DataError, match=expected):
        run_validated(recipe)
    _assert_untouched(out, before)


@pytest.mark.integration
def test_reduced_quickstart_end_to_end(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rows = run_validated(recipe)
    for name in ("results.json", "results.md", "speed_accuracy.png", "calibration.json", "model/model.safetensors",
                 "model/tokenizer.json", "predictions/full_test.json", "examples.md"):
        assert (out / name).is_file(), name
    test_rows = [r for r in rows if r["split"] == "test"]
    assert {r["batch_size"] for r in test_rows} == {4, 1}
    assert all(r["wall_speedup"] and r["efficiency"] for r in test_rows)
    # at batch 1 a layer call is a row-layer: the two speed-ups coincide
    assert all(abs(r["call_speedup"] - r["timed_layer_speedup"]) < 1e-9
               for r in test_rows if r["batch_size"] == 1 and r["method"] != "full")
    assert "calls x" in (out / "results.md").read_text()
    assert all("CIDEr" in r["metrics"] for r in rows)
    predictions = json.loads((out / "predictions/full_test.json").read_text())
    assert len(predictions) == 12 and {"image_id", "caption"} <= set(predictions[0])
    # the trained run is a product: mmexit.load(run).caption agrees with the run's test predictions
    import mmexit

    lines = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    points = json.loads((out / "operating_points.json").read_text())["points"]
    images = [out.parent / "scenes" / "images" / "test" / line["image"] for line in lines]
    for entry in points:
        predictor = mmexit.load(out, rule=entry["key"], device="cpu")
        results = predictor.caption(images, batch_size=recipe["evaluate"]["batch_size"])
        assert [r["caption"] for r in results] == [line[entry["key"]]["caption"] for line in lines]
        assert [r["layers"] for r in results] == [line[entry["key"]]["layers"] for line in lines]
    assert mmexit.load(out, device="cpu").operating_point == points[0]["key"]
    # photos are decoded a batch at a time (any batch size gives the same captions), and a missing or
    # unreadable one is named before any photo is encoded
    assert [r["caption"] for r in predictor.caption(images, batch_size=5)] == [r["caption"] for r in results]
    # the search can be chosen per call: beam_size 1 is the run's greedy decoding, more is beam search
    # (no layers per token), and the search's own values are checked
    assert predictor.caption(images, batch_size=5, beam_size=1) == predictor.caption(images, batch_size=5)
    beam = predictor.caption(images[:4], beam_size=3, length_penalty=0.5, no_repeat_ngram=2)
    assert len(beam) == 4 and all(r["layers"] is None and r["caption"] for r in beam)
    for bad, message in (({"beam_size": 0}, "beam_size: expected an integer >= 1"),
                         ({"no_repeat_ngram": 2}, "apply to beam search: give beam_size > 1 too")):
        with pytest.raises(DataError, match=message):
            predictor.caption(images[:1], **bad)
    predictor.model.encode = lambda pixels: pytest.fail("encoded before every input was checked")
    (tmp_path / "notes.jpg").write_text("not a photo")
    for bad, message in ((tmp_path / "gone.jpg", "input 12: image file does not exist: .*gone.jpg"),
                         (tmp_path / "notes.jpg", "input 12: cannot read image .*notes.jpg: UnidentifiedImageError")):
        with pytest.raises(DataError, match=message):
            predictor.caption(images + [bad], batch_size=5)
    # the benchmark tools read the run folder: speculative captions equal full greedy's, and the
    # continuous decoder's equal the step-synchronous decoder's
    import subprocess
    import sys

    bench = [sys.executable, "-m", "mmexit.runner", "bench"]
    speculative = subprocess.run([*bench, "speculative", str(out), "--images", "4", "--draft-layers", "1", "2",
                                  "--draft-tokens", "2", "--repeats", "1", "--costs", "--json",
                                  "--draft-vocab", "6", "--confidence", "0.3"],
                                 capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert speculative.returncode == 0, speculative.stderr[-2000:]
    report = json.loads(speculative.stdout)
    assert len(report["rows"]) == 5 and all(row["exact"] for row in report["rows"])
    assert report["draft_vocabulary"]["size"] <= 7 and 0 < report["draft_vocabulary"]["coverage"] < 1
    for row in report["rows"][1:]:  # the cost model: a ceiling (every draft kept) above its prediction
        if " conf " in row["decoder"]:  # drafts stopped early: no cost-model prediction
            assert row["predicted_speedup"] is None
            continue
        assert row["ceiling_speedup"] >= row["predicted_speedup"] > 0
        assert row["part_costs_ms"]["span"]["2"] > 0
    continuous = subprocess.run([*bench, "caption", str(out), "--rule", "maxprob@0.5", "--images", "6", "--rows", "3",
                                 "--repeats", "1", "--json"],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert continuous.returncode == 0, continuous.stderr[-2000:]
    table = {row["decoder"]: row for row in json.loads(continuous.stdout)["rows_table"]}
    assert table["continuous exit"]["same_captions"] == 6
    # evaluate again from the saved model and calibration, without training
    again = run_validated(dict(recipe, run=dict(recipe["run"], stages=["evaluate", "report"], overwrite=True)))
    assert [r["rule"] for r in again] == [r["rule"] for r in rows]
    # deferred compute: exact cache, so each swept point scores as its oracle twin, with real costs
    deferred = run_validated(dict(recipe, run=dict(recipe["run"], stages=["evaluate"], overwrite=True),
                                  evaluate=dict(recipe["evaluate"], policy="deferred", oracle_sweep=True)))
    sweep = [r for r in deferred if r["split"] == "calib" and r["method"] != "full"]
    real, oracle = sweep[0::2], sweep[1::2]
    assert all(r["method"] + " (oracle)" == o["method"] for r, o in zip(real, oracle))
    assert all(not r["simulated"] and o["simulated"] for r, o in zip(real, oracle))
    # equal up to a rare near-tie token flip (chunked and single-token attention round differently)
    same = [r["metrics"] == o["metrics"] for r, o in zip(real, oracle)]
    assert sum(same) >= len(same) - 1, [(r["metrics"], o["metrics"]) for r, o in zip(real, oracle)]
    assert any(r.get("catchup_layers", 0) > 0 for r in real)
