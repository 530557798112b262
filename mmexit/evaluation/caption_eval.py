"""Decoding, scoring, timing and example pages for a captioner's exit rules (the pieces of the
captioning task's hooks of the evaluation loop, ``tasks.caption_evaluation``).

The chosen points are decoded on the test split and timed against the full model at each
``timing_batch_sizes`` (BENCHMARKS.md protocol: same process, alternating, median).
``wall_speedup`` is per generated token (time / row-steps decoded), matching the per-token layer
speed-up even when the two paths write captions of different lengths; ``wall_speedup_total`` is
the plain time ratio. The timer covers the decoder path only (cross-attention K/V, layers,
heads, search); the image encoder is timed on its own (``encoder_ms`` per image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mmexit.data.coco import CaptionItem
from mmexit.evaluation.rows import ResultRow
from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup
from mmexit.evaluation.timing import time_alternating
from mmexit.exits.base import ExitRule
from mmexit.files import atomic_write_text
from mmexit.inference.search import DecodeResult, beam_decode, greedy_decode


def decode(model, features: torch.Tensor, rule: Optional[ExitRule], evaluate: dict, batch_size: int, tokenizer,
           policy: Optional[str] = None) -> DecodeResult:
    """Decode features [N, P, d] in batches of ``batch_size``; one merged DecodeResult."""
    policy = policy or evaluate["policy"]
    tokens, layers, exits, token_layers, catchup, step_layers = [], [], [], [], 0, []
    for start in range(0, features.shape[0], batch_size):
        batch = features[start:start + batch_size]
        if evaluate["decoding"] == "beam":
            result = beam_decode(model, batch, rule, evaluate["beam_size"], evaluate["max_len"], tokenizer.bos_id,
                                 tokenizer.eos_id, evaluate["length_penalty"], policy,
                                 no_repeat_ngram=evaluate.get("no_repeat_ngram", 0))
        else:
            result = greedy_decode(model, batch, rule, evaluate["max_len"], tokenizer.bos_id, tokenizer.eos_id, policy)
        tokens += result.tokens
        token_layers += result.token_layers
        layers.append(result.layers)
        exits.append(result.exit_index)
        catchup += result.catchup_layers
        step_layers += result.step_layers
    return DecodeResult(tokens, torch.cat(layers), torch.cat(exits), token_layers, simulated=policy == "oracle",
                        catchup_layers=catchup, step_layers=step_layers)


@torch.inference_mode()
def project(model, encoded: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encoder outputs [N, P, D] -> decoder-width image features [N, P, width] in batches."""
    return torch.cat([model.project(encoded[i:i + batch_size]) for i in range(0, encoded.shape[0], batch_size)])


@torch.inference_mode()
def encode(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Image features [N, patches, width] in batches."""
    return torch.cat([model.encode(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def caption_row(method: str, rule_label: str, point, split: str, metrics: dict, result: DecodeResult, model,
                batch_size, simulated: bool, warning: Optional[str] = None, **extra) -> ResultRow:
    """A result row of one decoding run (layers per generated token; calls per step; catch-up)."""
    if result.step_layers:  # layer calls: a batch's step costs its deepest row's layers when calls are row-bound
        extra.setdefault("call_speedup", layer_speedup(torch.tensor(result.step_layers), model.num_layers))
    if result.catchup_layers:  # deferred compute: earlier positions' layers run later, in chunks
        computed = int(result.layers.sum()) + result.catchup_layers
        extra["catchup_layers"] = result.catchup_layers
        extra["compute_speedup"] = model.num_layers * result.layers.numel() / max(computed, 1)
    wall = extra.pop("wall_speedup", None)
    eff = extra.pop("efficiency", None)
    return ResultRow(method, rule_label, point, split, metrics, "CIDEr", layer_speedup(result.layers, model.num_layers),
                     exit_histogram(result.exit_index, model.exits), simulated, wall, eff, batch_size, warning,
                     extra=extra)


def captions_of(result: DecodeResult, items: list[CaptionItem], tokenizer) -> dict[int, str]:
    return {item.image_id: tokenizer.decode(ids) for item, ids in zip(items, result.tokens)}


def timed_rows(model, timed: dict, full_test: DecodeResult, full_metrics: dict, test_results: list) -> list[dict]:
    """Test rows of the full model and each chosen point per timed batch size (``time_points``'s
    output); ``test_results``: (rule, choice, DecodeResult, scores) per point."""
    rows = []
    for batch_size, info in timed.items():
        rows.append(caption_row("full", "full", None, "test", full_metrics, full_test, model, batch_size, False,
                                wall_speedup=1.0, efficiency=1.0, time_full_s=info["full"],
                                encoder_ms=info["encoder_ms"], timed_images=info["images"]).to_dict())
        for position, (rule, choice, result, scores) in enumerate(test_results):
            key = f"exit{position}"
            # per generated (row-step) token, so captions of different lengths compare fairly
            wall = (info["full"] / info["full_tokens"]) / (info[key] / info[f"{key}_tokens"])
            warning = "; ".join(w for w in (choice.note, rule.warning) if w) or None
            rows.append(caption_row(
                rule.name, rule.describe(), rule.threshold, "test", scores, result, model, batch_size, False, warning,
                wall_speedup=wall, efficiency=efficiency(wall, info[f"{key}_layer_speedup"]),
                timed_layer_speedup=info[f"{key}_layer_speedup"], call_speedup=info[f"{key}_call_speedup"],
                call_efficiency=wall / info[f"{key}_call_speedup"], time_full_s=info["full"], time_exit_s=info[key],
                encoder_ms=info["encoder_ms"], timed_images=info["images"], timed_tokens_full=info["full_tokens"],
                timed_tokens_exit=info[f"{key}_tokens"], wall_speedup_total=info["full"] / info[key],
                **choice.as_extra("calib")).to_dict())
    return rows


def time_points(model, evaluate: dict, tokenizer, images: torch.Tensor, rules: list) -> dict:
    """Per batch size: median seconds of the full and each early-exit decoder over the same images."""
    out = {}
    for batch_size in evaluate["timing_batch_sizes"]:
        count = evaluate["timing_images"] if batch_size > 1 else max(4, evaluate["timing_images"] // 4)
        subset = images[:count]
        with torch.inference_mode():
            encoder_time = time_alternating({"encoder": lambda: encode(model, subset, batch_size)},
                                            evaluate["timing_repeats"], warmup=1)["encoder"]
            features = encode(model, subset)
        info = {"images": int(subset.shape[0]), "encoder_ms": 1000 * encoder_time / subset.shape[0]}
        candidates = {"full": lambda: decode(model, features, None, evaluate, batch_size, tokenizer)}
        info["full_tokens"] = int(candidates["full"]().layers.numel())
        for position, rule in enumerate(rules):
            candidates[f"exit{position}"] = (lambda r=rule: decode(model, features, r, evaluate, batch_size, tokenizer))
            result = candidates[f"exit{position}"]()
            info[f"exit{position}_layer_speedup"] = layer_speedup(result.layers, model.num_layers)
            info[f"exit{position}_call_speedup"] = layer_speedup(torch.tensor(result.step_layers), model.num_layers)
            info[f"exit{position}_tokens"] = int(result.layers.numel())
        info.update(time_alternating(candidates, evaluate["timing_repeats"], warmup=1))
        out[batch_size] = info
    return out


def write_examples(output_dir: Path, items: list[CaptionItem], examples: dict, test_results, count: int) -> None:
    """examples.md / examples.json: references and each rule's caption (with layers per token)."""
    lines = ["## Example captions (test split)", ""]
    per_token = {rule.describe(): result for rule, _, result, _ in test_results}
    for position, item in enumerate(items[:count]):
        lines.append(f"**image {item.image_id}** ({item.path.name})  ")
        lines.append(f"- references: {' | '.join(item.captions[:3])}  ")
        for label, captions in examples.items():
            extra = ""
            if label in per_token and per_token[label].token_layers:
                extra = f" (layers per token: {per_token[label].token_layers[position]})"
            lines.append(f"- {label}: {captions[item.image_id]}{extra}  ")
        lines.append("")
    atomic_write_text(output_dir / "examples.md", "\n".join(lines) + "\n")
    payload = {str(item.image_id): {"references": item.captions,
                                     **{label: captions[item.image_id] for label, captions in examples.items()}}
               for item in items[:count]}
    atomic_write_text(output_dir / "examples.json", json.dumps(payload, indent=2))
