"""``mmexit bench {text,caption,speculative,engine,load,precision} ...``: the speed benchmarks (BENCHMARKS.md).

Every job prints a Markdown table with the machine (most also ``--json``); ``mmexit bench JOB --help``
lists its options. A user error (missing run, bad rule spec, non-loopback URL) prints one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Optional

from mmexit.bench import caption, engine, load, precision, speculative, text
from mmexit.errors import MMExitError

#: job -> (module with add_arguments(parser) and run(args) -> exit status, one-line help)
JOBS: dict[str, tuple[ModuleType, str]] = {
    "text": (text, "early exit vs the full model on a text run or recipe: metric, layer and wall-clock "
                   "speed-up, efficiency; checks measured == simulated exits"),
    "caption": (caption, "caption decoding, step-synchronous vs continuous, of a run's rule (or, with "
                         "--patterns, of fixed exit patterns): calls, speed-ups, efficiency"),
    "speculative": (speculative, "exact self-speculative decoding vs full greedy: a captioning run, or a "
                                 "causal LM on plain text"),
    "engine": (engine, "the serving engines in process (no HTTP): saturation texts/s, open-loop latency"),
    "load": (load, "open-loop / closed-loop HTTP load on an mmexit serve server (loopback only)"),
    "precision": (precision, "one text run at float32 / bfloat16 / int8: accuracy, calibrated point, "
                             "exits changed, speed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmexit bench", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog="e.g. mmexit bench text outputs/quickstart --quick; "
                                            "mmexit bench caption random --patterns")
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    for name, (module, summary) in JOBS.items():
        first = (module.__doc__ or summary).split("\n\n")[0]
        sub = jobs.add_parser(name, help=summary, description=first.split("``: ", 1)[-1],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n\n".join((module.__doc__ or "").split("\n\n")[1:]))
        module.add_arguments(sub)
        sub.set_defaults(job_parser=sub)
    return parser


def bench_main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` (after ``bench``), run the job; 0, 1 (an inconsistent result), or 2 on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    module = JOBS[args.job][0]
    if hasattr(module, "check_arguments"):
        module.check_arguments(args.job_parser, args)
    try:
        return module.run(args)
    except MMExitError as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(bench_main())
