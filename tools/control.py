#!/usr/bin/env python
"""Does a method deliver the accuracy a user dials in? Re-split a run's exit outputs and check.

    python tools/control.py RUN_DIR [--splits 50] [--json] [--deltas 0.8 0.85] [--alpha 0.1] [--seed 0]
                            [--methods pcee pcee-ltt ...] [--calib-size N]

RUN_DIR is a run folder holding ``exit_outputs.safetensors`` (or that file itself). The calibration
and test samples are pooled and re-split ``--splits`` times; each method (the paper's PCEE,
max-prob at delta, LTT on agreement with the full model, mmexit's guaranteed PCEE variants) is
calibrated on one part and measured on the other, per target accuracy delta (default: from about
the first exit's accuracy to the full model's). Prints a Markdown table (``--json``: one JSON
object). See ``mmexit.evaluation.control``. Exit status 0, or 2 with one ``mmexit: error:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _deltas(values: Optional[list[str]]) -> Optional[list[float]]:
    """--deltas 0.8 0.85 or --deltas 0.8,0.85 (both accepted)."""
    from mmexit.evaluation.control import ControlCheckError

    if not values:
        return None
    out = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise ControlCheckError(f"--deltas: {part!r} is not a number") from None
    return out


def close_progress_bars() -> None:
    """End any progress bar's line, so an error message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def main(argv: Optional[list[str]] = None) -> int:
    from mmexit.evaluation.control import DEFAULT_METHODS, METHODS

    parser = argparse.ArgumentParser(
        prog="tools/control.py",
        description="Accuracy-control check: calibrate each method on random re-splits of a run's calibration+test "
                    "samples and measure how well it delivers the target accuracy delta.")
    parser.add_argument("run_dir", help="run folder with exit_outputs.safetensors, or the file itself")
    parser.add_argument("--splits", type=int, default=50, help="random re-splits (default 50)")
    parser.add_argument("--deltas", nargs="+", help="target accuracies (default: spanning first exit .. full model)")
    parser.add_argument("--alpha", type=float, default=0.1, help="risk level of the guaranteed methods (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-splits (default 0)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"methods to compare (default: all): {', '.join(METHODS)}")
    parser.add_argument("--calib-size", type=int, default=None, metavar="N",
                        help="samples in each calibration part (default: the run's calibration split size)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from mmexit.errors import MMExitError
    from mmexit.evaluation.control import load_exit_outputs, run_control_check

    try:
        outputs = load_exit_outputs(args.run_dir)
        report = run_control_check(outputs, _deltas(args.deltas), args.splits, args.alpha, args.seed, args.methods,
                                   progress=not args.quiet, calib_size=args.calib_size)
    except MMExitError as error:
        close_progress_bars()
        print(f"mmexit: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        print("mmexit: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
