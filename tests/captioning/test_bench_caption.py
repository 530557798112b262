"""tools/bench_caption.py on a tiny random decoder: the table is produced with the known layer speed-ups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_caption_table_on_a_tiny_decoder():
    result = subprocess.run(
        [sys.executable, "tools/bench_caption.py", "--width", "32", "--layers", "4", "--heads", "2", "--vocab", "30",
         "--images", "4", "--steps", "4", "--repeats", "1", "--batch-sizes", "2", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
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
