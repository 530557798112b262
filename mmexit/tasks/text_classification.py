"""Text classification (GLUE, offline corpora) as a task: data, model, training, statistics, evaluation
(through the one evaluation loop, with ``tasks.text_evaluation.TextEvaluator`` as its hooks)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from mmexit.calibration.rule_spec import RULE_RESERVED
from mmexit.calibration.statistics import ExitStatistics
from mmexit.data.examples import TextTask
from mmexit.data.text import Collator, LengthGroupedBatches, batches, load_text_task
from mmexit.errors import RecipeError
from mmexit.evaluation import text_eval
from mmexit.evaluation.loop import Evaluation, evaluate_rules
from mmexit.exits.base import ExitRule
from mmexit.models.encoder import CONFIG_NAME, MultiExitEncoder
from mmexit.models.loading import load_backbone, load_tokenizer, truncate_backbone
from mmexit.recipe.language import build_component
from mmexit.tasks.base import Run, Task
from mmexit.tasks.text_evaluation import TextEvaluator
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss
from mmexit.training.trainer import train_stage

logger = logging.getLogger(__name__)


class TextClassificationTask(Task):
    """``task: text_classification``."""

    name = "text_classification"

    def load_data(self, recipe: dict) -> TextTask:
        data = load_text_task(recipe["data"])
        if not data.splits["train"] and "train" in recipe["run"]["stages"]:
            raise RecipeError(f"data: the training split of {data.name} is empty")
        for split in ("calib", recipe["evaluate"]["split"]):
            if not data.splits[split]:
                raise RecipeError(f"data: the {split} split of {data.name} is empty")
        return data

    def check_rules(self, recipe: dict, data: TextTask) -> None:
        for index, spec in enumerate(recipe["evaluate"]["rules"]):
            cls_rule = build_component(spec, "rule", f"evaluate.rules[{index}]", reserved=RULE_RESERVED)
            if data.is_regression and cls_rule.needs_probabilities:
                raise RecipeError(f"evaluate.rules[{index}].name: rule '{cls_rule.name}' needs class probabilities, "
                                  f"but {data.name} is a regression task; allowed: patience, fixed, never")

    # ------------------------------------------------------------------------------------ model
    def build_model(self, run: Run) -> tuple[MultiExitEncoder, object]:
        model_cfg = run.recipe["model"]
        trained = run.output_dir / "model"
        source = model_cfg["init_from"]
        if source is None and "train" not in run.recipe["run"]["stages"]:
            if not (trained / CONFIG_NAME).exists():
                raise RecipeError(f"run.stages: no trained model in {trained} to evaluate (add the train stage, "
                                  "or set model.init_from to a trained run)")
            source = str(trained)
        tokenizer = load_tokenizer(model_cfg["backbone"], run.recipe["data"]["cache_dir"])
        if source is not None:
            model = MultiExitEncoder.from_pretrained(source)
            if model.num_labels != run.data.num_labels:
                raise RecipeError(f"model.init_from: {source} has {model.num_labels} outputs, "
                                  f"{run.data.name} needs {run.data.num_labels}")
            return model, tokenizer
        backbone = load_backbone(model_cfg["backbone"], run.recipe["data"]["cache_dir"], model_cfg["attn_implementation"])
        if model_cfg["num_layers"] is not None:
            truncate_backbone(backbone, model_cfg["num_layers"])
        model = MultiExitEncoder(backbone, run.data.num_labels, model_cfg["exits"], model_cfg["pooling"],
                                 model_cfg["head_dropout"])
        return model, tokenizer

    def train(self, run: Run) -> list[dict]:
        train, seed = run.recipe["train"], run.recipe["run"]["seed"]
        examples = run.data.splits["train"]
        collate = Collator(run.processor, run.recipe["model"]["max_length"])

        def stage(loss, epochs, lr, stage_seed, name):
            sampler = LengthGroupedBatches(examples, train["batch_size"], stage_seed)
            return train_stage(run.model, loss, examples, collate, run.accelerator, train, epochs, lr, stage_seed,
                               name, batch_sampler=sampler, checkpointing=run.checkpointing)

        if train["schedule"] == "two_stage":
            history = stage(FinalOnlyLoss(), train["epochs"], train["lr"], seed, "stage1")
            return history + stage(InternalExitsLoss(), train["stage2_epochs"] or train["epochs"],
                                   train["stage2_lr"] or train["head_lr"] or train["lr"], seed + 1, "stage2")
        loss = build_component(train["loss"], "loss", "train.loss")
        return stage(loss, train["epochs"], train["lr"], seed, "train")

    def save_model(self, run: Run, folder: Path) -> None:
        model = run.accelerator.unwrap_model(run.model)
        model.save_pretrained(folder, {"task": run.data.name, "labels": run.data.label_names,
                                       "max_length": run.recipe["model"]["max_length"]})
        run.processor.save_pretrained(str(folder))

    # ----------------------------------------------------------------------------- statistics
    def split_batches(self, run: Run, split: str, batch_size: int, limit: Optional[int] = None) -> list[dict]:
        """Padded batches of a split (tokenized before any timer starts)."""
        examples = run.data.splits[split][:limit] if limit else run.data.splits[split]
        return list(batches(run.processor, examples, batch_size, run.recipe["model"]["max_length"]))

    def _outputs(self, run: Run, split: str) -> text_eval.SplitOutputs:
        key = f"outputs:{split}"
        if key not in run.state:
            run.state[key] = text_eval.collect_exit_outputs(
                run.model, self.split_batches(run, split, run.recipe["evaluate"]["batch_size"]), run.accelerator,
                f"all exits ({split})")
        return run.state[key]

    def before_precision(self, run: Run) -> None:
        """Every exit's float32 outputs on the calibration and evaluation splits, kept to count the exit
        decisions ``evaluate.dtype`` changes and the point a float32 calibration would choose."""
        splits = {run.recipe["calibration"]["split"], run.recipe["evaluate"]["split"]}
        run.state["float32"] = {split: text_eval.collect_exit_outputs(
            run.model, self.split_batches(run, split, run.recipe["evaluate"]["batch_size"]), run.accelerator,
            f"float32 exits ({split})") for split in splits}

    def statistics(self, run: Run) -> ExitStatistics:
        outputs = self._outputs(run, run.recipe["calibration"]["split"])
        return ExitStatistics(outputs.labels, list(run.model.exit_layers), outputs.logits.shape[-1], outputs.logits)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, run: Run, rules: list[tuple[dict, ExitRule]], calib: ExitStatistics) -> Evaluation:
        evaluator = TextEvaluator(run, lambda split: self._outputs(run, split),
                                  lambda split, size, limit=None: self.split_batches(run, split, size, limit))
        if not run.accelerator.is_main_process:  # sweeps and timing run once, on the main process
            return Evaluation(evaluator.reference()[0], {}, evaluator.predictions())
        evaluator.save_outputs()
        return evaluate_rules(evaluator, rules, run.recipe["evaluate"]["tolerance"])

    def title(self, run: Run) -> str:
        return f"{run.recipe['run']['name']}: {run.recipe['model']['backbone']} on {run.data.name}"

    # ------------------------------------------------------------------------------ inference
    def load_for_inference(self, run_dir: Path, recipe: dict, device: Optional[str] = None, weights: bool = True):
        from transformers import AutoTokenizer

        folder = Path(run_dir) / "model"
        model = MultiExitEncoder.from_pretrained(folder, weights).eval()
        if device and weights:
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return model, tokenizer


