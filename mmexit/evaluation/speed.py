"""Layer speed-up, efficiency and exit histograms (the conventions of METHODS.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def layer_speedup(layers_used: Tensor, total_layers: int) -> float:
    """L * N / sum(layers used); layers_used: [N] layers each sample (or token) ran."""
    used = float(layers_used.sum())
    return total_layers * layers_used.numel() / used if used > 0 else float("inf")


def exit_histogram(exit_index: Tensor, exit_layers: Sequence[int]) -> dict[str, int]:
    """Count of samples per exit, keyed by the exit's layer number (as a string, JSON-safe)."""
    counts = torch.bincount(exit_index.flatten().long(), minlength=len(exit_layers))
    return {str(layer): int(count) for layer, count in zip(exit_layers, counts.tolist())}


def efficiency(wall_speedup: float | None, layer_speedup_value: float) -> float | None:
    """Wall-clock speed-up / layer speed-up: 1.0 is the limit of a method that only skips layers."""
    if wall_speedup is None:
        return None
    return wall_speedup / layer_speedup_value
