"""BEEM: exits as experts whose agreeing votes add up; exit when the running score passes alpha_i.

Score (each exit is an expert with prediction yhat_i and confidence c_i = max softmax(z_i / T_i)):

    S_1 = w_1 c_1
    S_i = S_{i-1} + w_i c_i   if yhat_i == yhat_{i-1}    (consecutive experts agree)
    S_i = w_i c_i             otherwise                  (restart = "own", the default)

Exit at the first exit i with S_i >= alpha_i; the last exit always stops.

Restart choice: mmexit follows the paper's figure, where a disagreement restarts the run with
the current expert's own score ``w_i c_i`` (``restart="own"``). The official ALBERT code restarts
at 0 and uses w_1 = 0; ``restart="zero"`` gives the restart-at-0 behaviour (mmexit keeps w_1 as
set, it does not force it to 0).

Weights w_i: ``weights="accuracy"`` is BEEM-A (each exit's accuracy on the calibration split,
set by ``BEEMCalibration``); ``weights="cost"`` is BEEM-C with w_i = layer_i / L (the exit's
share of the model's cost); a list of M numbers is BEEM-C with the user's own cost weights.

Thresholds alpha_i are chosen on the calibration split by ``BEEMCalibration`` (see
``select_thresholds``): exit by exit from the first, the smallest alpha_t such that the error
rate among the calibration samples that would stop at exit t is at most the final exit's error
rate plus ``threshold``. So the sweep knob (``threshold``) is an *error-rate slack*: 0 is the
paper's rule, larger values let more samples leave early (faster, less accurate), negative values
are stricter than the paper. The rule keeps the calibration statistics in memory so
``with_threshold`` can recompute the alphas for any slack; ``calibration_state`` additionally
stores the alphas of every point of ``default_sweep`` so a reloaded rule can be swept too.

Regression heads (one output) have no agreement or confidence: BEEM refuses them.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor

from mmexit.errors import CalibrationError, RecipeError
from mmexit.exits.base import ExitRule, ExitView, RuleState
from mmexit.exits.confidence import PerExitTemperature

RESTARTS = ("own", "zero")


def beem_scores(confidence: Tensor, prediction: Tensor, weights: Tensor, restart: str = "own") -> Tensor:
    """Every exit's score S_i for every row: confidence/prediction [M, N], weights [M] -> [M, N]."""
    scores = torch.empty_like(confidence, dtype=torch.float32)
    score = weights[0] * confidence[0]
    scores[0] = score
    for index in range(1, confidence.shape[0]):
        own = weights[index] * confidence[index]
        agree = prediction[index] == prediction[index - 1]
        fallback = own if restart == "own" else torch.zeros_like(own)
        score = torch.where(agree, score + own, fallback)
        scores[index] = score
    return scores


def select_thresholds(
    scores: Tensor,
    correct: Tensor,
    slack: float = 0.0,
    exit_layers: Optional[list[int]] = None,
    cost_weight: Optional[float] = None,
) -> list[float]:
    """Per-exit alphas [M] (inf = never stop there; the last is 0) from calibration scores [M, N].

    Exit by exit from the first, over the samples no earlier exit stopped: a candidate alpha stops
    the samples with S_t >= alpha; it is feasible when their error rate is <= the final exit's
    error rate (over all calibration samples) + ``slack``. Without ``cost_weight`` the smallest
    feasible alpha is taken (the most samples leave, as in the paper). With ``cost_weight`` = lam,
    the feasible alpha minimising  errors(stopped)/n + lam * (not stopped)/n * (L - l_t)/L  is taken
    (n = samples still running; a trade of errors against the layers still to run).
    """
    num_exits, rows = scores.shape
    target = float((~correct[-1]).float().mean()) + float(slack) if rows else 0.0
    layers = exit_layers or list(range(1, num_exits + 1))
    depth = layers[-1]
    running = torch.ones(rows, dtype=torch.bool)
    alphas: list[float] = []
    for index in range(num_exits - 1):
        s = scores[index][running]
        wrong = (~correct[index][running]).float()
        n = s.numel()
        if n == 0:
            alphas.append(math.inf)
            continue
        order = torch.argsort(s, descending=True, stable=True)
        s_sorted, wrong_sorted = s[order], wrong[order]
        stops = torch.arange(1, n + 1, dtype=torch.float32)  # k samples stop when the cut is after k
        errors = wrong_sorted.cumsum(0)
        # a cut after position k is valid only where the score drops (ties stop together)
        valid = torch.ones(n, dtype=torch.bool)
        valid[:-1] = s_sorted[:-1] > s_sorted[1:]
        feasible = valid & (errors / stops <= target + 1e-12)
        if not bool(feasible.any()):
            alphas.append(math.inf)
            continue
        if cost_weight is None:
            cut = int(torch.nonzero(feasible)[-1])
        else:
            remaining_share = (depth - layers[index]) / depth
            objective = errors / n + float(cost_weight) * (n - stops) / n * remaining_share
            # the no-stop option (objective = lam * remaining_share) competes too
            objective = torch.where(feasible, objective, torch.full_like(objective, math.inf))
            cut = int(torch.argmin(objective))
            if float(objective[cut]) >= float(cost_weight) * remaining_share:
                alphas.append(math.inf)
                continue
        alpha = float(s_sorted[cut])
        alphas.append(alpha)
        running &= ~(scores[index] >= alpha)
    alphas.append(0.0)
    return alphas


class BEEMRule(PerExitTemperature, ExitRule):
    """BEEM's agreement-accumulated score against per-exit thresholds alpha_i (see module doc).

    threshold: error-rate slack over the final exit's calibration error (the sweep knob).
    weights: "accuracy" (BEEM-A, from the calibration split), "cost" (BEEM-C, layer_i / L) or a
        list of M cost weights (BEEM-C, the user's).
    restart: "own" (paper's figure, default) or "zero" (official code) on disagreement.
    cost_weight: optional lambda trading calibration errors against the layers still to run.
    """

    name = "beem"
    needs_calibration = True
    conservative_direction = "ascending"  # the knob is an error-rate slack: smaller = stricter

    def __init__(
        self,
        threshold: float = 0.0,
        weights: str | list[float] = "accuracy",
        restart: str = "own",
        cost_weight: float | None = None,
    ) -> None:
        super().__init__(threshold)
        if isinstance(weights, str) and weights not in ("accuracy", "cost"):
            raise RecipeError(f"rule beem: weights {weights!r} is not allowed; allowed: accuracy, cost, or a list")
        if restart not in RESTARTS:
            raise RecipeError(f"rule beem: restart {restart!r} is not allowed; allowed: {', '.join(RESTARTS)}")
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]
        self.restart = restart
        self.cost_weight = None if cost_weight is None else float(cost_weight)
        #: per-exit weights w_i in use (set by the calibration, or from a user's list)
        self.expert_weights: Optional[list[float]] = None if isinstance(weights, str) else list(self.weights)
        #: per-exit thresholds alpha_i at the current ``threshold`` (inf: never stop there)
        self.alphas: Optional[list[float]] = None
        #: alphas of each swept slack, keyed by f"{slack:g}" (kept for reloaded rules)
        self.alpha_table: dict[str, list[float]] = {}
        self.final_error: Optional[float] = None
        self._statistics: Optional[dict] = None  # calibration data (in memory only)

    # ---------------------------------------------------------------------------- inference
    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {
            "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "score": torch.zeros(batch_size, dtype=torch.float32, device=device),
        }

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        if self.alphas is None or self.expert_weights is None:
            raise CalibrationError(
                "rule beem is not calibrated: give it 'calibration: {name: beem}' in the recipe "
                "(or call BEEMCalibration().fit)"
            )
        confidence, prediction = self.scaled(view).softmax(-1).max(-1)
        own = self.expert_weights[view.exit_index] * confidence
        agree = prediction == state["previous"]
        first = state["previous"] < 0  # S_1 = w_1 c_1 under both restarts
        fallback = own if self.restart == "own" else torch.where(first, own, torch.zeros_like(own))
        state["score"] = torch.where(agree, state["score"] + own, fallback)
        state["previous"] = prediction
        return state["score"] >= self.alphas[view.exit_index]

    # ------------------------------------------------------------------------ operating points
    def set_statistics(self, confidence: Tensor, prediction: Tensor, correct: Tensor, exit_layers: list[int]) -> None:
        """Keep the calibration split's statistics ([M, N] each) and derive weights and alphas."""
        num_exits = confidence.shape[0]
        if self.weights == "accuracy":
            self.expert_weights = [float(v) for v in correct.float().mean(1)]
        elif self.weights == "cost":
            self.expert_weights = [layer / exit_layers[-1] for layer in exit_layers]
        elif len(self.weights) != num_exits:
            raise CalibrationError(
                f"rule beem: weights has {len(self.weights)} entries but the model has {num_exits} exits"
            )
        self._statistics = {
            "scores": beem_scores(confidence, prediction, torch.tensor(self.expert_weights), self.restart),
            "correct": correct,
            "exit_layers": list(exit_layers),
        }
        self.final_error = float((~correct[-1]).float().mean())
        self.alpha_table = {f"{t:g}": self._alphas_for(t) for t in self.default_sweep()}
        self.alphas = self._alphas_for(self.threshold)

    def _alphas_for(self, slack: float) -> list[float]:
        key = f"{slack:g}"
        if self._statistics is None:
            if key in self.alpha_table:
                return list(self.alpha_table[key])
            raise CalibrationError(
                f"rule beem: no thresholds for slack {slack:g}: the calibration data is not in memory "
                f"and the saved calibration covers only {sorted(self.alpha_table)}"
            )
        stats = self._statistics
        return select_thresholds(stats["scores"], stats["correct"], slack, stats["exit_layers"], self.cost_weight)

    def with_threshold(self, threshold: float) -> "BEEMRule":
        clone = copy.copy(self)
        clone.threshold = float(threshold)
        if self._statistics is not None or self.alpha_table:
            clone.alphas = self._alphas_for(float(threshold))
        return clone

    def default_sweep(self) -> list[float]:
        return [-0.05, -0.02, 0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]

    def describe(self) -> str:
        kind = "A" if self.weights == "accuracy" else "C"
        return f"beem-{kind}@slack={self.threshold:g}"

    # -------------------------------------------------------------------------------- saving
    def calibration_state(self) -> dict:
        def encode(alphas):
            return None if alphas is None else [None if math.isinf(a) else a for a in alphas]

        return {
            "temperatures": self.temperatures,
            "expert_weights": self.expert_weights,
            "alphas": encode(self.alphas),
            "alpha_table": {key: encode(value) for key, value in self.alpha_table.items()},
            "final_error": self.final_error,
            "restart": self.restart,
        }

    def load_calibration_state(self, state: dict) -> None:
        def decode(alphas):
            return None if alphas is None else [math.inf if a is None else float(a) for a in alphas]

        self.temperatures = state.get("temperatures")
        self.expert_weights = state.get("expert_weights")
        self.alphas = decode(state.get("alphas"))
        self.alpha_table = {key: decode(value) for key, value in (state.get("alpha_table") or {}).items()}
        self.final_error = state.get("final_error")
        self.restart = state.get("restart", self.restart)
