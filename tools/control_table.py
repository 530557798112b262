#!/usr/bin/env python
"""One compact Markdown table per task from ``tools/control.py --json`` outputs.

    python tools/control.py RUN_DIR --json > control_TASK.json
    python tools/control_table.py control_sst2.json control_mrpc.json ...

Cells: mean achieved accuracy (x100) / violation rate / mean layer speed-up, per target delta and
method; then the reference ``oracle-maxprob`` (the fastest max-prob threshold with violations <= alpha
on the test parts themselves, when the report has it) and the guaranteed PCEE's (pcee-ltt) speed-up
over the paper PCEE's.
"""

from __future__ import annotations

import json
import sys

METHODS = ("pcee", "maxprob@delta", "ltt-agree", "pcee-ltt", "pcee-ltt-table", "pcee-cp")


def table(report: dict) -> str:
    """The Markdown table of one control report (the JSON object tools/control.py prints)."""
    lines = [f"### {report['task']}: calibration part {report['calib_size']}, test part {report['test_size']}, "
             f"first exit {report['first_exit_accuracy']:.3f}, full model {report['full_accuracy']:.3f}, "
             f"alpha {report['alpha']}, {report['splits']} splits", "",
             "| delta | " + " | ".join(METHODS) + " | oracle-maxprob (reference) | pcee-ltt / pcee speed-up |",
             "|---|" + "---|" * (len(METHODS) + 2)]
    rows = {(row["delta"], row["method"]): row for row in report["rows"] + report.get("oracle", [])}
    for delta in report["deltas"]:
        cells = []
        for method in METHODS + ("oracle-maxprob",):
            row = rows.get((delta, method))
            cells.append("-" if row is None else
                         f"{100 * row['mean_accuracy']:.1f} / {100 * row['violation_rate']:.0f}% / {row['mean_speedup']:.2f}x")
        ltt, paper = rows.get((delta, "pcee-ltt")), rows.get((delta, "pcee"))
        ratio = f"{ltt['mean_speedup'] / paper['mean_speedup']:.2f}" if ltt and paper else "-"
        lines.append(f"| {delta:.3f} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: tools/control_table.py CONTROL_JSON [...]", file=sys.stderr)
        return 2
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                report = json.load(handle)
        except (OSError, ValueError) as error:
            print(f"mmexit: error: {path}: {error}", file=sys.stderr)
            return 2
        print(table(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
