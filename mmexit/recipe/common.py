"""Schema pieces every task's recipe shares: the ``run`` section and value checks."""

from __future__ import annotations

from mmexit.recipe.language import Component, Field, ListOf

STAGES = ("train", "calibrate", "evaluate", "report")



def stages_ok(value: list) -> str | None:
    unknown = [stage for stage in value if stage not in STAGES]
    if unknown:
        return f"unknown stage {unknown[0]!r}; allowed: {', '.join(STAGES)}"
    return None


def exits_ok(value) -> str | None:
    if isinstance(value, str):
        return None if value == "all" else f"{value!r} is not allowed; use 'all' or a list of layer numbers"
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return "expected 'all' or a non-empty list of layer numbers >= 1"
    if list(value) != sorted(set(value)):
        return "layer numbers must be strictly increasing"
    return None


def positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def fraction(value) -> str | None:
    return None if 0 < value < 1 else f"must be between 0 and 1 (exclusive), got {value}"


def resume_ok(value) -> str | None:
    return None if value in (True, False, "auto") else f"{value!r} is not allowed; allowed: true, false, auto"


def positive_or_none(value) -> str | None:
    return None if value is None or value > 0 else f"must be > 0 (or null for all), got {value}"


def fraction_or_zero(value) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def batch_sizes_ok(value) -> str | None:
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return "expected a non-empty list of positive batch sizes"
    return None


def non_empty(value) -> str | None:
    return None if value else "expected a non-empty list"


TOLERANCE_DOC = ("per rule, the fastest operating point whose primary metric on the calibration split is "
                 "within this relative drop (in %) of the full model's: 1.0 = at least 99% of it")

RUN_SCHEMA = {
    "name": Field((str,), default="run", doc="a label for tables and logs"),
    "output_dir": Field((str,), required=True, doc="folder the run writes into"),
    "seed": Field((int,), default=0, doc="seeds torch, numpy and python (accelerate.set_seed)"),
    "stages": Field((list,), default=list(STAGES), check=stages_ok,
                    doc="any of train, calibrate, evaluate, report, in that order"),
    "overwrite": Field((bool,), default=False,
                       doc="allow writing into an output folder that already holds results"),
    "num_threads": Field((int,), nullable=True, default=None, doc="torch.set_num_threads on CPU"),
    "checkpoint_every": Field((int,), nullable=True, default=None, check=positive_or_none,
                              doc="save a training checkpoint every N optimiser steps (and at each epoch end)"),
    "keep_checkpoints": Field((int,), default=2, check=positive, doc="newest checkpoints kept"),
    "resume": Field((bool, str), default=False, check=resume_ok,
                    doc="true: continue from the newest complete checkpoint; auto: if there is one"),
    "log_with": Field((str,), nullable=True, default="auto", choices=("auto", "tensorboard", "none"),
                      doc="accelerate tracker: auto = TensorBoard when installed"),
}

#: ``evaluate.rules`` of every task: rule components, each with an optional sweep and calibration
RULES = ListOf(Component("rule", reserved={
    "sweep": Field((list,), nullable=True, default=None, doc="operating points to sweep (default: the rule's own grid)"),
    "calibration": Component("calibration", nullable=True, default=None,
                             doc="how this rule's parameters are set on the calibration split"),
}), default=[{"name": "maxprob"}], check=non_empty,
    doc="rules to sweep and measure; each may add sweep: [...] and calibration: {...}")
