"""``mmexit bench caption`` on a tiny random decoder: fixed exit patterns with their known layer
speed-ups, and a rule under both decoders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bench_caption(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmexit.runner", "bench", "caption", "random", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_patterns_table_on_a_tiny_decoder():
    result = bench_caption("--patterns", "--width", "32", "--layers", "4", "--heads", "2", "--vocab", "30",
                           "--images", "4", "--steps", "4", "--repeats", "1", "--batch-sizes", "2", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| 2 ")]
    layer_x = {(cells[1], cells[2]): float(cells[3]) for cells in rows}
    compute_x = {(cells[1], cells[2]): float(cells[4]) for cells in rows}
    step, cont = "step-sync", "continuous"
    assert layer_x[step, "never"] == 1.0 and layer_x[step, "fixed@1"] == 2.0  # exit 1 = layer 2 of 4
    assert layer_x[step, "alternate@1 deferred"] == layer_x[step, "alternate@1 propagate"] == 1.33
    assert compute_x[step, "alternate@1 deferred"] < layer_x[step, "alternate@1 deferred"]  # catch-up work is counted
    # the continuous decoder runs the same patterns; parity@k depends on each token alone, so both
    # decoders stop the same tokens (the same layer speed-up)
    assert layer_x[cont, "full"] == layer_x[cont, "never"] == 1.0 and layer_x[cont, "fixed@1"] == 2.0
    assert layer_x[cont, "parity@1"] == layer_x[step, "parity@1"]
    assert not any(name.startswith("alternate") for decoder, name in layer_x if decoder == cont)
    assert any(line.startswith("| 1 ") for line in result.stdout.splitlines())
    assert not any(line.startswith("| 1 | continuous") for line in result.stdout.splitlines())


def test_decoders_option_and_rule_specs():
    result = bench_caption("--width", "32", "--layers", "4", "--heads", "2", "--vocab", "30", "--images", "4",
                           "--rows", "2", "--max-len", "5", "--repeats", "1", "--decoders", "continuous",
                           "--rule", "entropy@0.5", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["rule"] == "entropy@0.5"
    assert {row["decoder"] for row in report["rows_table"]} == {"step-sync full", "continuous full", "continuous exit"}
    bad = bench_caption("--rule", "pcee@0.9", "--images", "2")
    assert bad.returncode == 2 and "mmexit: error: rule: 'pcee' needs a calibration" in bad.stderr


def test_patterns_with_a_pool_deeper_than_a_call():
    result = bench_caption("--patterns", "--width", "32", "--layers", "4", "--heads", "2", "--vocab", "30",
                           "--images", "8", "--steps", "4", "--repeats", "1", "--batch-sizes", "2", "--pool", "4",
                           "--image-size", "32", "--decoders", "continuous")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 patches" in result.stdout  # 32 pixels, 16-pixel patches
    rows = {cells[2]: cells for cells in ([cell.strip() for cell in line.split("|")[1:-1]]
                                          for line in result.stdout.splitlines() if line.startswith("| 2 | continuous"))}
    assert float(rows["full"][7]) == 1.0 and float(rows["full"][8]) == 1.0  # against itself
    assert float(rows["fixed@1"][3]) == 2.0
    # efficiency against the continuous full model = its wall speed-up / the layer speed-up
    assert abs(float(rows["fixed@1"][8]) - float(rows["fixed@1"][7]) / 2.0) < 0.011
    for bad, message in ((("--pool", "0"), "--pool must be >= 1"), (("--image-size", "40"), "--image-size must be")):
        failed = bench_caption("--patterns", "--images", "2", "--steps", "2", "--repeats", "1", "--batch-sizes", "2",
                               *bad)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr
