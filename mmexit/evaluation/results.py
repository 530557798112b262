"""results.json, the Markdown table and the speed-accuracy plot of a run.

Rows follow ``mmexit.evaluation.rows.ResultRow`` (written as dicts).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from mmexit.evaluation.rows import check_row
from mmexit.files import atomic_write_text


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], machine: dict | None = None, title: str = "Results") -> str:
    """One line per row: method, rule, split, (dtype), metrics, speed-ups, efficiency, batch, simulated."""
    metric_names: list[str] = []
    for row in rows:
        for name in row["metrics"]:
            if name not in metric_names:
                metric_names.append(name)
    calls = any("call_speedup" in row for row in rows)  # captioning: speed-up in layer calls per step
    dtypes = any(row.get("dtype", "float32") != "float32" for row in rows)  # a run at another precision says so
    header = ["method", "rule", "split", *(["dtype"] if dtypes else []), *metric_names, "layer x", *(["calls x"] if calls else []), "wall x",
              "eff.", "batch", "sim."]
    lines = [f"# {title}", ""]
    if machine:
        lines.append(
            "Machine: " + ", ".join(f"{key}={value}" for key, value in machine.items()) + "  "
        )
        lines.append("Timing: model path only (tokenization and data loading outside the timer).")
        lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        metric_cells = []
        for name in metric_names:
            value = row["metrics"].get(name)
            metric_cells.append(_fmt(100 * value if _is_fraction(name) and value is not None else value))
        cells = [
            row["method"], row["rule"], row["split"], *([row.get("dtype", "float32")] if dtypes else []), *metric_cells,
            _fmt(row["layer_speedup"]), *([_fmt(row.get("call_speedup"))] if calls else []),
            _fmt(row["wall_speedup"]), _fmt(row["efficiency"]),
            _fmt(row["batch_size"]), "yes" if row["simulated"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if row.get("warning"):
            lines.append(f"| ^ warning: {row['warning']} |" + " |" * (len(header) - 1))
    lines.append("")
    lines.append("Fraction metrics (accuracy, F1, MCC, Pearson, Spearman) are shown x100.")
    if dtypes:
        lines.append("dtype: the inference precision (evaluate.dtype) of calibration and evaluation; measured rows "
                     "carry exits_changed (share of rows whose exit differs from the float32 model's at the same "
                     "point) and float32_point in results.json.")
    if calls:
        lines.append("calls x: layer speed-up counted in layer calls (per decoding step, the layers its deepest row "
                     "ran). When one call costs about the same for 1 or 16 rows (small decoders, memory-bound "
                     "steps), wall-clock follows calls x, not layer x.")
    return "\n".join(lines) + "\n"


def _is_fraction(metric_name: str) -> bool:
    return metric_name.lower() in {"accuracy", "f1", "mcc", "pearson", "spearman", "acc_and_f1", "pearson_spearman"}


def plot_speed_accuracy(rows: list[dict], path: Path, title: str = "") -> None:
    """Layer speed-up (x) against the primary metric (y), one line per method/rule family.

    Simulated sweep rows are drawn as lines, measured rows as filled markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    families: dict[str, list[dict]] = {}
    for row in rows:
        if not row["simulated"]:
            continue
        families.setdefault(row["method"], []).append(row)
    for family, members in families.items():
        points = sorted((r["layer_speedup"], r["metrics"][r["primary_metric"]]) for r in members)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"{family} (simulated)")
    measured = [r for r in rows if not r["simulated"]]
    if measured:
        axis.scatter(
            [r["layer_speedup"] for r in measured],
            [r["metrics"][r["primary_metric"]] for r in measured],
            marker="o", color="black", zorder=3, label="measured points",
        )
    metric = rows[0]["primary_metric"] if rows else "metric"
    axis.set_xlabel("layer speed-up (x)")
    axis.set_ylabel(metric)
    axis.set_title(title or "speed-accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(handle)
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def write_results(
    output_dir: Path, recipe: dict, rows: list[dict], machine: dict, title: str = "Results"
) -> dict[str, Path]:
    """Write results.json, results.md and speed_accuracy.png into ``output_dir``; return the paths."""
    for row in rows:
        check_row(row)
    output_dir = Path(output_dir)
    paths = {
        "json": output_dir / "results.json",
        "markdown": output_dir / "results.md",
        "plot": output_dir / "speed_accuracy.png",
    }
    payload = {"recipe": recipe, "machine": machine, "rows": rows}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=_json_default))
    atomic_write_text(paths["markdown"], markdown_table(rows, machine, title))
    plot_speed_accuracy(rows, paths["plot"], title)
    return paths


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
