"""Per-token calibration statistics for the exit rules, from teacher forcing on the calibration split.

N = every target token of the calibration captions (all references of each image). For each exit
i and token: confidence c_i = max softmax, prediction yhat_i, and whether it is "correct":
- ``labels="full_model"`` (default): correct = yhat_i equals the full model's (last exit's) argmax
  at that position. This is what early exit changes at decoding time: a token that differs from
  the full model's. The final exit is then always "correct", so BEEM's rule (error rate <= the
  final exit's + slack) reads the slack as the allowed disagreement rate, and PCEE's delta is
  the asked-for agreement with the full model.
- ``labels="reference"``: correct = yhat_i equals the reference next token.
BEEM and PCEE take the statistics through their calibrations' ``fit_statistics`` (so the
vocabulary-sized logits are never all held); other calibrations get the logits themselves when
they fit in ``max_logit_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from mmexit.captioning.training import batch_tensors
from mmexit.errors import CalibrationError


@dataclass
class TokenStatistics:
    confidence: Tensor  # [M, N] float32
    prediction: Tensor  # [M, N] long
    labels: Tensor  # [N] long (the chosen notion of correct token)
    logits: Optional[Tensor]  # [M, N, V] or None when too large

    @property
    def correct(self) -> Tensor:
        return self.prediction == self.labels[None]


@torch.inference_mode()
def collect_statistics(model, images: Tensor, captions: list[list[list[int]]], tokenizer, labels: str = "full_model",
                       batch_size: int = 64, max_length: int = 24, max_logit_bytes: int = 512 * 2**20,
                       device: torch.device | str = "cpu") -> TokenStatistics:
    """Teacher-forced per-exit statistics over all (image, caption) pairs."""
    pairs = [(i, ids) for i, per_image in enumerate(captions) for ids in per_image]
    vocab = model.decoder.config.vocab_size
    keep_logits = len(pairs) * max_length * model.num_exits * vocab * 4 <= max_logit_bytes
    confidence, prediction, label_list, logit_list = [], [], [], []
    model.eval()
    for start in tqdm(range(0, len(pairs), batch_size), desc="calibration tokens", mininterval=5):
        chunk = pairs[start:start + batch_size]
        inputs, targets = batch_tensors([p[1] for p in chunk], tokenizer.bos_id, tokenizer.eos_id,
                                        tokenizer.pad_id, max_length)
        features = model.encode(images[torch.tensor([p[0] for p in chunk])].to(device))
        logits = model.forward_exits(features, inputs.to(device))
        mask = (targets != -100).to(device)
        flat = torch.stack([z[mask] for z in logits]).float()  # [M, n, V]
        prob, pred = flat.softmax(-1).max(-1)
        confidence.append(prob.cpu())
        prediction.append(pred.cpu())
        label_list.append(pred[-1].cpu() if labels == "full_model" else targets[targets != -100])
        if keep_logits:
            logit_list.append(flat.cpu())
    if not confidence:
        raise CalibrationError("calibration: the calibration split has no captions")
    return TokenStatistics(torch.cat(confidence, 1), torch.cat(prediction, 1), torch.cat(label_list),
                           torch.cat(logit_list, 1) if keep_logits else None)


def fit_rule(rule, calibration, stats: TokenStatistics, exit_layers: list[int], vocab_size: int) -> None:
    """Set a rule's parameters with its calibration component from the token statistics."""
    from mmexit.calibration.beem import BEEMCalibration
    from mmexit.calibration.pcee import PCEECalibration

    if isinstance(calibration, BEEMCalibration):
        calibration.fit_statistics(rule, stats.confidence, stats.prediction, stats.correct, exit_layers)
    elif isinstance(calibration, PCEECalibration):
        calibration.fit_statistics(rule, stats.confidence, stats.correct, vocab_size)
    elif stats.logits is not None:
        calibration.fit(rule, stats.logits, stats.labels, exit_layers)
    else:
        raise CalibrationError(f"calibration {type(calibration).__name__}: needs all-exit logits, too large to hold "
                               "for this vocabulary; use calibration.max_images to calibrate on fewer images")
