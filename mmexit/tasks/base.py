"""The task seam: what differs between tasks, as one small interface.

A task (text classification, captioning, ...) says how to load and check its data, build or load
its model, train it (through the one trainer), collect exit statistics for calibration, evaluate
rules (sweeps, chosen points, timing: through the shared row contract and operating-point
chooser) and load a trained run for inference. ``mmexit.stages`` runs train -> calibrate ->
evaluate -> report for any task; ``mmexit.serve.predictor`` uses ``load_for_inference``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmexit.calibration.statistics import ExitStatistics
from mmexit.evaluation.loop import Evaluation
from mmexit.exits.base import ExitRule


@dataclass
class Run:
    """What the stages of one run share."""

    recipe: dict
    task: "Task"
    output_dir: Path  # the run's folder: where a trained model is read from
    accelerator: Any
    write_dir: Optional[Path] = None  # where this run writes (a staging folder inside output_dir)
    data: Any = None
    model: Any = None
    processor: Any = None  # tokenizer (text) or caption tokenizer (captioning)
    state: dict = field(default_factory=dict)  # per-task scratch (e.g. preprocessed images)
    checkpointing: Any = None  # mmexit.training.checkpoints.Checkpointing, when the recipe asks for it

    def __post_init__(self) -> None:
        if self.write_dir is None:
            self.write_dir = self.output_dir


class Task:
    """Base class of tasks. Subclasses implement every method below."""

    name: str = "task"

    def load_data(self, recipe: dict) -> Any:
        """The splits, every input checked (files, rows, images) before anything is written."""
        raise NotImplementedError

    def check_rules(self, recipe: dict, data: Any) -> None:
        """Refuse rules the task cannot serve (one line naming ``evaluate.rules[i]``)."""

    def build_model(self, run: Run) -> tuple[Any, Any]:
        """(model, processor): fresh for training, or the trained one (``model.init_from``, or the
        run's own ``model/`` when it does not train)."""
        raise NotImplementedError

    def train(self, run: Run) -> list[dict]:
        """Train ``run.model`` with the one trainer; return the logged rows."""
        raise NotImplementedError

    def save_model(self, run: Run, folder: Path) -> None:
        """Write the trained model and its processor into ``folder``."""
        raise NotImplementedError

    def before_precision(self, run: Run) -> None:
        """Called once with the float32 model before ``evaluate.dtype`` is applied to it: keep what the
        evaluation compares against (e.g. float32 exit outputs, to count decisions that change)."""

    def statistics(self, run: Run) -> ExitStatistics:
        """Exit statistics on the calibration split (for calibrations and operating-point choice)."""
        raise NotImplementedError

    def evaluate(self, run: Run, rules: list[tuple[dict, ExitRule]], calib: ExitStatistics) -> Evaluation:
        """Full model, sweeps, chosen operating points measured (and timed) on the evaluation split."""
        raise NotImplementedError

    def title(self, run: Run) -> str:
        return f"{run.recipe['run']['name']}: {self.name}"

    def load_for_inference(self, run_dir: Path, recipe: dict, device: Optional[str] = None,
                           weights: bool = True) -> tuple[Any, Any]:
        """(model, processor) of a trained run folder, in eval mode; ``weights=False``: the model's
        structure only, on the meta device (``device`` is ignored)."""
        raise NotImplementedError
