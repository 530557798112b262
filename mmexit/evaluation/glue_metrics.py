"""Task metrics from scikit-learn and scipy: accuracy, F1, MCC, Pearson, Spearman."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import Tensor


def predictions_from_logits(logits: Tensor) -> np.ndarray:
    """Class index per row, or the score for one-output (regression) logits. [N]."""
    if logits.shape[-1] == 1:
        return logits[..., 0].float().cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


def compute_metrics(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics of ``predictions`` against ``labels`` (fractions in [0, 1] / correlations)."""
    results = {}
    for name in names:
        if name == "accuracy":
            results[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            results[name] = float(f1_score(labels, predictions))
        elif name == "mcc":
            results[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            results[name] = float(pearsonr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        elif name == "spearman":
            results[name] = float(spearmanr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        else:
            raise ValueError(f"unknown metric {name}")
    return results
