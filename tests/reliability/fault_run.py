"""Run ``mmexit run`` with a fault injected (for the reliability tests), without test hooks in mmexit.

    python fault_run.py kill_after_checkpoint:K RECIPE [key=value ...]   SIGKILL after the K-th checkpoint
    python fault_run.py term_after_step:K RECIPE ...                     SIGTERM to itself after step K
    python fault_run.py kill_in_evaluate RECIPE ...                      SIGKILL when predictions are written
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mmexit.stages as stages  # noqa: E402
import mmexit.training.trainer as trainer  # noqa: E402
from mmexit.runner import main  # noqa: E402


def inject(mode: str) -> None:
    kind, _, value = mode.partition(":")
    if kind == "kill_after_checkpoint":
        original, calls = trainer.save_checkpoint, {"n": 0}

        def save_then_die(*args, **kwargs):
            path = original(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == int(value):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        trainer.save_checkpoint = save_then_die
    elif kind == "term_after_step":
        original_check = trainer.check_finite

        def check_then_term(accelerator, loss, step, stage, what="loss"):
            original_check(accelerator, loss, step, stage, what)
            if step == int(value) and what == "loss":  # during step K: the run stops after it
                os.kill(os.getpid(), signal.SIGTERM)

        trainer.check_finite = check_then_term
    elif kind == "kill_in_evaluate":
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        stages.write_predictions = die


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
