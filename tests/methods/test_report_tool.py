"""tools/report.py: Pareto-front interpolation at matched speed-ups, and the table from results.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mmexit_report_tool", REPO / "tools" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_metric_at_interpolates_on_the_pareto_front():
    points = [(1.0, 0.90), (1.5, 0.88), (2.0, 0.80), (2.0, 0.85), (3.0, 0.70), (1.2, 0.80)]
    # front: (1.0, .90), (1.5, .88), (2.0, .85), (3.0, .70); (1.2, .80) is dominated
    assert report.pareto(points) == [(1.0, 0.90), (1.5, 0.88), (2.0, 0.85), (3.0, 0.70)]
    assert report.metric_at(points, 1.5) == pytest.approx(0.88)
    # cost-space interpolation between (2.0, .85) and (3.0, .70): share (1/2 - 1/2.5) / (1/2 - 1/3) = 0.6
    assert report.metric_at(points, 2.5) == pytest.approx(0.85 - 0.15 * 0.6)
    assert report.best_at(points, 2.5) == pytest.approx(0.70)
    assert report.metric_at(points, 3.5) is None


def _row(method, rule, acc, speed, simulated, batch=None, wall=None):
    return {"method": method, "rule": rule, "operating_point": 0.0, "split": "test", "metrics": {"accuracy": acc},
            "primary_metric": "accuracy", "layer_speedup": speed, "wall_speedup": wall,
            "efficiency": None if wall is None else wall / speed, "batch_size": batch, "exit_histogram": {},
            "simulated": simulated}


def test_render_from_results(tmp_path):
    rows = [_row("full", "full", 0.9, 1.0, False, 32, 1.0),
            _row("joint+maxprob", "maxprob@0.9", 0.89, 1.5, True), _row("joint+maxprob", "maxprob@0.8", 0.85, 2.5, True),
            _row("joint+maxprob", "maxprob@0.9", 0.88, 1.6, False, 32, 1.4)]
    folder = tmp_path / "joint_sst2"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"recipe": {"data": {"task": "sst2"}, "model": {"backbone": "b"}},
                                                     "machine": {}, "rows": rows}))
    text = report.render(report.load_runs([str(tmp_path)]))
    assert "| joint+maxprob | 90.0 | 89.0 (89.0) | 86.5 (85.0) | - (-) |" in text
    assert "88.0 (own full 90.0) / 1.60x / 1.40x (b32)" in text
