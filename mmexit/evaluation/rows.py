"""The one result-row contract (text and captioning alike) and how rows become dicts.

A row is one (method, operating point, split, batch size) figure. ``results.json`` holds them as
dicts (``ResultRow.to_dict``); keys a task adds (``time_full_s``, ``call_speedup``,
``encoder_ms``, ...) live in ``extra`` and are written beside the fixed ones. Every row of a run
also carries ``dtype``, the inference precision it was measured at (``with_dtype``; rows written
before it existed read as float32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torch import Tensor

from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup


@dataclass
class ResultRow:
    """method: training + rule ("joint+maxprob", "full"); rule: the rule's label at its point
    ("maxprob@0.9"); metrics: task metrics; layer_speedup: L*N / sum(layers used) (per generated
    token for captioning); wall_speedup: time(full) / time(early exit), same run and batch size;
    efficiency: wall / layer speed-up; exit_histogram: samples (tokens) per exit layer; simulated:
    True when exits were decided after running every layer (no wall-clock figure then)."""

    method: str
    rule: str
    operating_point: Optional[float]
    split: str
    metrics: dict[str, float]
    primary_metric: str
    layer_speedup: float
    exit_histogram: dict[str, int]
    simulated: bool
    wall_speedup: Optional[float] = None
    efficiency: Optional[float] = None
    batch_size: Optional[int] = None
    warning: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = asdict(self)
        extra = row.pop("extra")
        if row["warning"] is None:
            row.pop("warning")
        return row | extra

    @classmethod
    def from_dict(cls, row: dict) -> "ResultRow":
        fixed = {name for name in cls.__dataclass_fields__ if name != "extra"}
        return cls(**{k: v for k, v in row.items() if k in fixed}, extra={k: v for k, v in row.items() if k not in fixed})


REQUIRED_KEYS = tuple(name for name, spec in ResultRow.__dataclass_fields__.items()
                      if name not in ("warning", "extra"))


def check_row(row: dict) -> None:
    """Raise ValueError when a row lacks a required key (a programming error, not a user one)."""
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise ValueError(f"result row lacks keys {missing}: {row}")


def exit_row(method: str, rule_label: str, point: Optional[float], split: str, metrics: dict, primary: str,
             exit_index: Tensor, exit_layers: list[int], num_layers: int, simulated: bool,
             layers_used: Optional[Tensor] = None, **extra: Any) -> ResultRow:
    """A row from the exit index of every sample [N] (layers used: the exits' layers unless given)."""
    import torch

    layers = torch.tensor(exit_layers)[exit_index.cpu()] if layers_used is None else layers_used
    return ResultRow(method, rule_label, point, split, metrics, primary, layer_speedup(layers, num_layers),
                     exit_histogram(exit_index, exit_layers), simulated, extra=extra)


def timed(row: ResultRow, batch_size: int, wall: float, timed_layer_speedup: float, **extra: Any) -> ResultRow:
    """A copy of ``row`` with its wall-clock figure at ``batch_size`` (efficiency over the timed subset)."""
    from dataclasses import replace

    return replace(row, wall_speedup=wall, efficiency=efficiency(wall, timed_layer_speedup), batch_size=batch_size,
                   extra=row.extra | {"timed_layer_speedup": timed_layer_speedup, **extra})


def full_model_rows(split: str, metrics: dict[str, float], primary: str, num_layers: int, count: int,
                    batch_sizes: list[int]) -> list[dict]:
    """The full model's reference rows (speed-ups 1 by definition), one per timed batch size, as dicts;
    ``count`` samples all leave at layer ``num_layers``."""
    return [ResultRow("full", "full", None, split, metrics, primary, 1.0, {str(num_layers): int(count)}, False,
                      1.0, 1.0, size).to_dict() for size in batch_sizes]


def with_dtype(rows: list[dict], dtype: str) -> list[dict]:
    """The rows, each stamped with the inference precision (``evaluate.dtype``) they were measured at."""
    return [row | {"dtype": dtype} for row in rows]
