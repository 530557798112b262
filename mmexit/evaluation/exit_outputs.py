"""A run's exit outputs: every exit's logits and the labels on its calibration and test splits.

The file ``exit_outputs.safetensors`` in a text classification run folder (written at its
evaluate stage): tensors ``calib.logits`` [M, Nc, C], ``calib.labels`` [Nc], ``test.logits``
[M, Nt, C], ``test.labels`` [Nt]; metadata ``exit_layers`` (JSON list of 1-based layers, the last =
the model's depth), ``task``, ``primary_metric``. Read by the accuracy-control check
(``mmexit.evaluation.control``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from torch import Tensor

from mmexit.errors import DataError
from mmexit.files import atomic_write_bytes

EXIT_OUTPUTS_FILE = "exit_outputs.safetensors"
TENSORS = ("calib.logits", "calib.labels", "test.logits", "test.labels")


@dataclass
class ExitOutputs:
    """Every exit's logits [M, N, C] and labels [N] on the calibration and test splits of one run."""

    calib_logits: Tensor
    calib_labels: Tensor
    test_logits: Tensor
    test_labels: Tensor
    exit_layers: list[int]
    task: str = "?"
    primary_metric: str = "accuracy"
    path: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.exit_layers[-1])

    @property
    def num_classes(self) -> int:
        return int(self.calib_logits.shape[-1])


def _exit_outputs_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    if path.is_dir():
        file = path / EXIT_OUTPUTS_FILE
        if not file.is_file():
            raise DataError(f"{path}: no {EXIT_OUTPUTS_FILE} in this folder (text classification runs write it "
                            "at their evaluate stage; re-run the run's evaluate stage)")
        return file
    if not path.exists():
        raise DataError(f"{path}: no such run folder or {EXIT_OUTPUTS_FILE} file")
    return path


def load_exit_outputs(path: Union[str, Path]) -> ExitOutputs:
    """Read a run folder's (or a file's) exit outputs, or raise one ``DataError`` line naming the problem."""
    file = _exit_outputs_file(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            metadata = handle.metadata() or {}
            missing = [name for name in TENSORS if name not in keys]
            if missing:
                raise DataError(f"{file}: lacks the tensors {', '.join(missing)} (expected {', '.join(TENSORS)})")
            tensors = {name: handle.get_tensor(name) for name in TENSORS}
    except SafetensorError as error:
        raise DataError(f"{file}: not a readable safetensors file ({error})") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: cannot read it as safetensors ({error})") from None
    calib_logits, calib_labels = tensors["calib.logits"], tensors["calib.labels"]
    test_logits, test_labels = tensors["test.logits"], tensors["test.labels"]
    for name, value, dims in (("calib.logits", calib_logits, 3), ("test.logits", test_logits, 3),
                              ("calib.labels", calib_labels, 1), ("test.labels", test_labels, 1)):
        if value.dim() != dims:
            raise DataError(f"{file}: tensor {name} has shape {list(value.shape)}, expected {dims} dimensions")
    if calib_logits.shape[0] != test_logits.shape[0] or calib_logits.shape[2] != test_logits.shape[2]:
        raise DataError(f"{file}: calib.logits {list(calib_logits.shape)} and test.logits {list(test_logits.shape)} "
                        "differ in exits or classes")
    if calib_logits.shape[1] != calib_labels.shape[0] or test_logits.shape[1] != test_labels.shape[0]:
        raise DataError(f"{file}: the logits and labels of a split have different sample counts")
    if calib_logits.shape[2] < 2:
        raise DataError(f"{file}: one output per exit (a regression head); the accuracy-control check needs class logits")
    if calib_logits.shape[1] < 2 or test_logits.shape[1] < 1:
        raise DataError(f"{file}: the calibration or test split is (nearly) empty")
    if calib_labels.is_floating_point() or test_labels.is_floating_point():
        raise DataError(f"{file}: labels are floating point (a regression task); the check needs class labels")
    if "exit_layers" not in metadata:
        raise DataError(f"{file}: no 'exit_layers' in the safetensors metadata (a JSON list of 1-based layers)")
    try:
        exit_layers = [int(v) for v in json.loads(metadata["exit_layers"])]
    except (ValueError, TypeError):
        raise DataError(f"{file}: metadata exit_layers is not a JSON list of integers: {metadata['exit_layers']!r}") from None
    if len(exit_layers) != calib_logits.shape[0] or exit_layers != sorted(set(exit_layers)) or exit_layers[0] < 1:
        raise DataError(f"{file}: metadata exit_layers {exit_layers} does not match the {calib_logits.shape[0]} "
                        "exits of the logits (increasing 1-based layers, one per exit)")
    return ExitOutputs(calib_logits.float(), calib_labels.long(), test_logits.float(), test_labels.long(), exit_layers,
                       metadata.get("task", "?"), metadata.get("primary_metric", "accuracy"), str(file))


def save_exit_outputs(path: Union[str, Path], outputs: ExitOutputs) -> None:
    """Write ``outputs`` in the run folder's format (for tests and for exit outputs built elsewhere)."""
    from safetensors.torch import save as save_bytes

    tensors = {"calib.logits": outputs.calib_logits.float().contiguous(), "calib.labels": outputs.calib_labels.contiguous(),
               "test.logits": outputs.test_logits.float().contiguous(), "test.labels": outputs.test_labels.contiguous()}
    metadata = {"exit_layers": json.dumps(list(outputs.exit_layers)), "task": outputs.task,
                "primary_metric": outputs.primary_metric}
    atomic_write_bytes(Path(path), save_bytes(tensors, metadata=metadata))
