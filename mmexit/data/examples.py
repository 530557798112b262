"""The common shape of a text-classification data set once loaded: three labelled splits."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class TextExample:
    """One sample: a text (or a pair) and its label (class index, or a float for regression)."""

    text_a: str
    text_b: Optional[str]
    label: Union[int, float]


@dataclass
class TextTask:
    """A task's splits and what its labels mean.

    splits: "train", "calib" (held out for calibration), "test" (where results are reported).
    label_names: class names in index order; empty for regression.
    metrics: the metric names of the task; primary_metric: the one tables lead with.
    """

    name: str
    splits: dict[str, list[TextExample]]
    label_names: list[str]
    metrics: tuple[str, ...]
    primary_metric: str
    provenance: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return max(1, len(self.label_names))

    @property
    def is_regression(self) -> bool:
        return not self.label_names


def deterministic_split(
    examples: list[TextExample], fractions: dict[str, float], seed: int
) -> dict[str, list[TextExample]]:
    """Shuffle with ``seed`` and cut into named parts; the part not named in fractions is "train"."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name, fraction in fractions.items():
        count = int(round(fraction * len(examples)))
        parts[name] = [examples[i] for i in order[start:start + count]]
        start += count
    parts["train"] = [examples[i] for i in order[start:]]
    return parts


def limit(examples: list[TextExample], maximum: Optional[int], seed: int) -> list[TextExample]:
    """At most ``maximum`` examples, a seeded random subset in the original order."""
    if maximum is None or len(examples) <= maximum:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), maximum))
    return [examples[i] for i in chosen]
