#!/usr/bin/env python
"""Turn mmexit result folders into the papers' table layout: method x task at matched speed-ups.

    python tools/report.py outputs/compare [more folders or results.json ...] --output report.md

Every ``results.json`` found under the given paths is read. For each (method, rule family) and
task the table gives:
- accuracy (the task's primary metric, x100) at layer speed-ups 1.5x, 2x and 3x, **interpolated
  from the simulated sweep** (all layers run, exits decided afterwards): linear interpolation on
  the sweep's Pareto front (best metric reachable at >= that speed-up); "-" when the sweep never
  reaches that speed-up. These columns are labelled "sim.";
- the **measured** operating point (chosen on the calibration split, run through the real
  batched early-exit path): metric, layer speed-up, and wall-clock speed-ups against the full
  model at batch 32 and 1 (same process, same batches), with efficiency = wall / layer.
The full model's metric heads each task. The Multi-Model cascade charges cumulative layers, so
its layer speed-up can be below 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = (1.5, 2.0, 3.0)


def load_runs(paths: list[str]) -> list[dict]:
    """Each results.json under ``paths`` as {"task", "backbone", "folder", "rows"}."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(path.rglob("results.json")))
    runs = []
    for file in files:
        payload = json.loads(file.read_text())
        recipe = payload.get("recipe", {})
        data = recipe.get("data", {})
        runs.append({
            "task": data.get("task", "?"),
            "backbone": recipe.get("model", {}).get("backbone", "?"),
            "folder": str(file.parent),
            "rows": payload.get("rows", []),
            "machine": payload.get("machine", {}),
            "num_layers": recipe.get("model", {}).get("num_layers"),
            "members": recipe.get("cascade_members"),
        })
    return runs


def family(row: dict) -> str:
    """method + the rule's name without its operating point, e.g. 'joint+beem-A'."""
    rule = str(row["rule"]).split("@", 1)[0]
    method = row["method"].split("+", 1)[0]
    return f"{method}+{rule}"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(speed-up, metric) points -> the front: for each speed-up, the best metric at >= it."""
    front: list[tuple[float, float]] = []
    best = float("-inf")
    for speed, metric in sorted(points, key=lambda p: (-p[0], -p[1])):
        if metric > best:
            best = metric
            front.append((speed, metric))
    return sorted(front)


def metric_at(points: list[tuple[float, float]], target: float) -> float | None:
    """Metric at layer speed-up ``target``, interpolated on the Pareto front in *cost* (1/speed-up).

    Between two front points, linear interpolation in cost is what a mix of the two operating
    points achieves (a share of rows at each), so the value is reachable; ``best_at`` gives the
    conservative figure (the best sweep point actually run at >= target).
    """
    front = pareto(points)
    if not front or target > front[-1][0] + 1e-9:
        return None
    if target <= front[0][0]:
        return front[0][1]
    for (s0, m0), (s1, m1) in zip(front, front[1:]):
        if s0 <= target <= s1:
            if s1 == s0:
                return max(m0, m1)
            share = (1 / s0 - 1 / target) / (1 / s0 - 1 / s1)
            return m0 + (m1 - m0) * share
    return None


def best_at(points: list[tuple[float, float]], target: float) -> float | None:
    """The best metric among sweep points whose layer speed-up is >= target (no interpolation)."""
    reached = [metric for speed, metric in points if speed >= target - 1e-9]
    return max(reached) if reached else None


def summarise(runs: list[dict]) -> tuple[dict, dict, list[str]]:
    """(family -> task -> cell dict), (task -> full metric), ordered task list."""
    table: dict[str, dict[str, dict]] = {}
    full: dict[str, float] = {}
    tasks: list[str] = []
    for run in runs:
        task = run["task"]
        if task not in tasks:
            tasks.append(task)
        rows = run["rows"]
        if run["num_layers"] is not None and run["members"] is None:
            # a static-truncation member: its full-model row is the point (cost k of L layers)
            row = next(r for r in rows if r["method"] == "full")
            table.setdefault(f"static truncation {run['num_layers']}L", {})[task] = {
                "static": row["metrics"][row["primary_metric"]], "layers": run["num_layers"], "folder": run["folder"]}
            continue
        for row in rows:
            if row["method"] == "full" and row.get("batch_size") in (32, None):
                # the reference full model: the joint-training run's last exit when there is one
                if task not in full or "joint" in Path(run["folder"]).name:
                    full[task] = row["metrics"][row["primary_metric"]]
        own_full = next((r["metrics"][r["primary_metric"]] for r in rows if r["method"] == "full"), None)
        by_family: dict[str, list[dict]] = {}
        for row in rows:
            if row["method"] == "full":
                continue
            by_family.setdefault(family(row), []).append(row)
        for name, members in by_family.items():
            simulated = [(r["layer_speedup"], r["metrics"][r["primary_metric"]]) for r in members if r["simulated"]]
            measured = [r for r in members if not r["simulated"]]
            cell = {"sim": {t: metric_at(simulated, t) for t in TARGETS},
                    "best": {t: best_at(simulated, t) for t in TARGETS}, "points": simulated, "folder": run["folder"],
                    "full": own_full}
            if measured:
                first = measured[0]
                cell["measured"] = {
                    "metric": first["metrics"][first["primary_metric"]],
                    "rule": first["rule"],
                    "layer_speedup": first["layer_speedup"],
                    "wall": {r["batch_size"]: r["wall_speedup"] for r in measured},
                    "efficiency": {r["batch_size"]: r["efficiency"] for r in measured},
                    "warning": first.get("warning"),
                }
            table.setdefault(name, {})[task] = cell
    return table, full, tasks


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(runs: list[dict]) -> str:
    """The Markdown report."""
    table, full, tasks = summarise(runs)
    methods = [name for name in sorted(table) if not name.startswith("static")]
    backbones = sorted({run["backbone"] for run in runs})
    machine = runs[0]["machine"] if runs else {}
    lines = [
        "# Early-exit methods compared",
        "",
        f"Backbone(s): {', '.join(backbones)}. Tasks: {', '.join(tasks)}. Metric: each task's primary metric x100.",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        "",
        "## Accuracy at matched layer speed-up (simulated sweeps, interpolated)",
        "",
        "Simulated: every layer ran once and exits were decided afterwards; these are not measured speed-ups.",
        "Cells: interpolated on the sweep's Pareto front in cost (1/speed-up), i.e. what mixing the two",
        "neighbouring operating points reaches; in brackets the best sweep point actually at >= that speed-up.",
        "",
        "Each method is compared with its own model's last exit (\"own full\", 1.00x): training changes it.",
        "",
        "| method | " + " | ".join(f"{task} own full | {task} @1.5x sim. | {task} @2x sim. | {task} @3x sim." for task in tasks) + " |",
        "|---|" + "---|" * (len(tasks) * (len(TARGETS) + 1)),
    ]
    for name in methods:
        cells = []
        for task in tasks:
            cell = table[name].get(task)
            cells.append(_pct(cell.get("full")) if cell else "n/a")
            cells += [f"{_pct(cell['sim'][t])} ({_pct(cell['best'][t])})" if cell else "n/a" for t in TARGETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    statics = sorted((name for name in table if name.startswith("static")), key=lambda n: int(n.split()[-1][:-1]))
    if statics:
        depth = max([int(name.split()[-1][:-1]) for name in statics] + [max(
            (int(layer) for run in runs for row in run["rows"] for layer in row.get("exit_histogram", {})
             if run["num_layers"] is None and run["members"] is None), default=0)])
        lines += ["", f"Static truncation (first k layers fine-tuned alone; layer speed-up {depth}/k):", "",
                  "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name in statics:
            cells = [f"{_pct(table[name][t]['static'])} @{depth / table[name][t]['layers']:.2f}x" if t in table[name] else "n/a"
                     for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Measured operating points (chosen on the calibration split, real batched early-exit path)",
        "",
        "Cells: metric / layer speed-up / wall-clock speed-up at batch 32 and batch 1 (efficiency = wall / layer at batch 32).",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        "| full model (joint training's last exit) | " + " | ".join(f"{_pct(full.get(task))} / 1.00x" for task in tasks) + " |",
    ]
    warnings = []
    for name in methods:
        cells = []
        for task in tasks:
            cell = table[name].get(task)
            if not cell or "measured" not in cell:
                cells.append("n/a")
                continue
            m = cell["measured"]
            eff = m["efficiency"].get(32)
            cells.append(
                f"{_pct(m['metric'])} (own full {_pct(cell.get('full'))}) / {_x(m['layer_speedup'])} / {_x(m['wall'].get(32))} (b32), "
                f"{_x(m['wall'].get(1))} (b1); eff {eff:.2f}" if eff is not None else
                f"{_pct(m['metric'])} (own full {_pct(cell.get('full'))}) / {_x(m['layer_speedup'])}"
            )
            if m.get("warning"):
                warnings.append(f"- {name} on {task} ({m['rule']}): {m['warning']}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if warnings:
        lines += ["", "Warnings of measured points:", *warnings]
    runs_rows: dict = {}
    for run in runs:
        if run["num_layers"] is None and run["members"] is None:
            runs_rows.setdefault(run["task"], []).extend(run["rows"])
    lines += claims(table, full, tasks, runs_rows)
    lines += ["", "Sources: " + ", ".join(sorted(run["folder"] for run in runs)), ""]
    return "\n".join(lines)


def _sim(table: dict, name: str, task: str, target: float) -> float | None:
    cell = table.get(name, {}).get(task)
    return None if not cell or "sim" not in cell else cell["sim"][target]


def _exit_accuracies(table: dict, name: str, task: str) -> list[float]:
    """Per-exit accuracy from a 'fixed' rule's simulated rows (fixed@k = every row at exit k)."""
    cell = table.get(name, {}).get(task)
    if not cell:
        return []
    return [metric for _, metric in sorted(cell["points"], key=lambda p: p[0], reverse=True)]


DELTAS = (0.80, 0.85, 0.90)


def _delta_tracking(name: str, task: str, runs_rows: dict) -> list[tuple[float, float | None]]:
    """(delta, test accuracy of the simulated sweep point whose operating point is delta), for the
    deltas of DELTAS the full model reaches (test accuracy >= delta)."""
    rows = runs_rows.get(task, [])
    full_accuracy = max((r["metrics"].get("accuracy", -1) for r in rows if r["method"] == "full"), default=-1)
    out = []
    for delta in DELTAS:
        if full_accuracy < delta:
            continue
        match = [r["metrics"].get("accuracy") for r in rows if r["method"] != "full" and r["simulated"]
                 and family(r) == name and r["operating_point"] is not None and abs(r["operating_point"] - delta) < 1e-9]
        out.append((delta, match[0] if match else None))
    return out


def claims(table: dict, full: dict, tasks: list[str], runs_rows: dict | None = None) -> list[str]:
    """The papers' claims (METHODS.md) checked against these results, one line each per task."""
    runs_rows = runs_rows or {}
    out = ["", "## The papers' claims, checked on these runs", ""]
    for task in tasks:
        out.append(f"### {task} (full model {_pct(full.get(task))})")
        sweet, joint = _exit_accuracies(table, "sweet+fixed", task), _exit_accuracies(table, "joint+fixed", task)
        if sweet and joint:
            pairs = ", ".join(f"exit {i + 1}: {_pct(a)} vs {_pct(b)}" for i, (a, b) in enumerate(zip(sweet, joint)))
            early = len(sweet) // 2
            held = all(a >= b for a, b in zip(sweet[:early], joint[:early]))
            out.append(f"- SWEET individual exits vs joint (early half {'>=' if held else 'NOT all >='}): {pairs}")
        for target in (2.0, 3.0):
            a, b = _sim(table, "sweet+maxprob", task, target), _sim(table, "joint+maxprob", task, target)
            m = _sim(table, "multi_model+maxprob", task, target)
            out.append(f"- SWEET vs joint vs Multi-Model at {target:g}x (sim.): {_pct(a)} vs {_pct(b)} vs {_pct(m)}")
        pcee, confidence = (_delta_tracking(n, task, runs_rows) for n in ("joint+pcee", "joint+maxprob"))
        pairs = [(d, a, b) for (d, a), (_, b) in zip(pcee, confidence) if a is not None and b is not None]
        if pairs:
            within = all(abs(a - d) <= 0.01 for d, a, _ in pairs)
            closer = all(abs(a - d) <= abs(b - d) for d, a, b in pairs)
            detail = ", ".join(f"delta {d:.2f}: PCEE {_pct(a)} vs max-prob@{d:.2f} {_pct(b)}" for d, a, b in pairs)
            out.append(f"- PCEE delta tracking (test accuracy, deltas the full model reaches): {detail} "
                       f"({'held' if within and closer else 'not held'}: claim is PCEE within 1 point of delta "
                       f"and closer than max-prob)")
        elif runs_rows.get(task):
            out.append(f"- PCEE delta tracking: no delta in {', '.join(f'{d:.2f}' for d in DELTAS)} is reachable "
                       f"(full model below it) or the sweeps lack them")
        static3 = table.get("static truncation 3L", {}).get(task)
        pcee2 = _sim(table, "joint+pcee", task, 2.0)
        if static3 and pcee2 is not None:
            out.append(f"- PCEE on the 6-layer model at 2x (sim.) vs a 3-layer model alone (same cost): "
                       f"{_pct(pcee2)} vs {_pct(static3['static'])} ({'held' if pcee2 >= static3['static'] else 'not held'})")
        for name in ("joint+beem-A", "joint+beem-C"):
            cell = table.get(name, {}).get(task)
            if cell and "measured" in cell and cell.get("full") is not None:
                m = cell["measured"]
                ok = m["metric"] >= cell["full"] and 1.5 <= m["layer_speedup"]
                fastest = max((speed for speed, metric in cell["points"] if metric >= cell["full"]), default=None)
                out.append(f"- {name} measured: {_pct(m['metric'])} at {m['layer_speedup']:.2f}x vs its full model {_pct(cell['full'])}; "
                           f"fastest simulated point at >= full: {_x(fastest)} "
                           f"({'held' if ok else 'not held'}: claim is >= full at 1.5x-2.1x)")
        c, p, j = (_sim(table, n, task, 2.0) for n in ("cosee+energy", "joint+patience", "joint+maxprob"))
        if c is not None:
            best = max((v for v in (p, j) if v is not None), default=None)
            verdict = "n/a" if best is None else ("held" if c > best else "not held")
            out.append(f"- COSEE at 2x (sim.): {_pct(c)} vs PABEE {_pct(p)} / joint max-prob {_pct(j)} ({verdict})")
        out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="result folders (searched for results.json) or results.json files")
    parser.add_argument("--output", help="write the Markdown here (default: print)")
    args = parser.parse_args(argv)
    runs = load_runs(args.paths)
    if not runs:
        print(f"report: no results.json under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    text = render(runs)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
