"""Greedy and beam search with per-token early exit, batched, over a ``CachedStepper``.

``greedy_decode`` / ``beam_decode`` take any stepper class with the ``CachedStepper`` interface
(``step(tokens, t)``, ``select(index)``, ``catchup_layers``); the tests pass an uncached reference
that recomputes the whole prefix through transformers' own blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.stepper import CachedStepper
from mmexit.models.kv_cache import ORACLE, PROPAGATE


@dataclass
class DecodeResult:
    """tokens: per input row, generated ids (EOS included when produced, BOS excluded).

    layers: [row_steps] layers each computed row ran at each step (beam: every beam row);
    exit_index: [row_steps] index of the exit each row-step stopped at;
    token_layers: per input row, layers run for each generated token (greedy only);
    catchup_layers: layer computations of earlier positions caught up under ``deferred``
    (position x layer; 0 under the other policies);
    step_layers: per decoding step of a batch, the layers its deepest row ran: the number of
    layer calls, which sets the step's time when a call costs the same for 1 or 16 rows.
    """

    tokens: list[list[int]]
    layers: Tensor
    exit_index: Tensor
    token_layers: list[list[int]] = field(default_factory=list)
    simulated: bool = False
    catchup_layers: int = 0
    step_layers: list[int] = field(default_factory=list)


def _exit_positions(model, layers: Tensor) -> Tensor:
    lookup = torch.full((model.num_layers + 1,), -1, dtype=torch.long)
    for index, layer in enumerate(model.exits):
        lookup[layer] = index
    return lookup[layers.cpu()]


@torch.inference_mode()
def greedy_decode(model, features: Tensor, rule: Optional[ExitRule] = None, max_len: int = 20,
                  bos_id: int = 1, eos_id: int = 2, policy: str = PROPAGATE,
                  stepper_class: type = CachedStepper) -> DecodeResult:
    """Greedy captions for features [B, patches, width]; rule None = the full model (no internal heads)."""
    batch, device = features.shape[0], features.device
    stepper = stepper_class(model, features, rule, max_len, policy)
    out_tokens = torch.full((batch, max_len), -1, dtype=torch.long)
    out_layers = torch.zeros(batch, max_len, dtype=torch.long)
    alive = torch.arange(batch)
    tokens = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    step_layers = []
    for t in range(max_len):
        logits, layers = stepper.step(tokens, t)
        next_tokens = logits.argmax(-1)
        out_tokens[alive, t] = next_tokens.cpu()
        out_layers[alive, t] = layers = layers.cpu()
        step_layers.append(int(layers.max()))
        done = next_tokens == eos_id
        if bool(done.any()):
            keep = ~done
            stepper.select(keep)
            alive, next_tokens = alive[keep.cpu()], next_tokens[keep]
            if alive.numel() == 0:
                break
        tokens = next_tokens
    valid = out_tokens >= 0
    tokens_list = [row[mask].tolist() for row, mask in zip(out_tokens, valid)]
    layer_list = [row[mask].tolist() for row, mask in zip(out_layers, valid)]
    flat = out_layers[valid]
    return DecodeResult(tokens_list, flat, _exit_positions(model, flat), layer_list, simulated=policy == ORACLE,
                        catchup_layers=stepper.catchup_layers, step_layers=step_layers)


@torch.inference_mode()
def beam_decode(model, features: Tensor, rule: Optional[ExitRule] = None, beam_size: int = 3, max_len: int = 20,
                bos_id: int = 1, eos_id: int = 2, length_penalty: float = 1.0, policy: str = PROPAGATE,
                stepper_class: type = CachedStepper, no_repeat_ngram: int = 0) -> DecodeResult:
    """Beam search with per-beam early exit; the best finished hypothesis per image.

    Each beam is a row of the cache; after each step the cache rows are reordered to the beams'
    origins. An EOS among the first ``beam_size`` candidates finishes a hypothesis (score /
    length ** length_penalty); an image is done when it has ``beam_size`` finished hypotheses
    (early stopping); at ``max_len`` its live beams are finished as they are. ``no_repeat_ngram``
    n > 0: a beam never extends into an n-gram it already holds (0: off).
    """
    batch, device = features.shape[0], features.device
    k = beam_size
    stepper = stepper_class(model, features.repeat_interleave(k, dim=0), rule, max_len, policy)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    images = list(range(batch))  # images alive, in cache order (k rows each)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    tokens = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    all_layers, step_layers = [], []
    for t in range(max_len):
        logits, layers = stepper.step(tokens, t)
        all_layers.append(layers.cpu())
        step_layers.append(int(all_layers[-1].max()))
        n = len(images)
        log_probs = logits.float().log_softmax(-1)
        if no_repeat_ngram > 0 and t >= no_repeat_ngram - 1:
            rows, banned = repeated_ngram_bans(history.tolist(), no_repeat_ngram)
            if rows:
                log_probs[torch.tensor(rows, device=device), torch.tensor(banned, device=device)] = float("-inf")
        vocab = log_probs.shape[-1]
        candidates = (scores.view(n, k, 1) + log_probs.view(n, k, vocab)).view(n, k * vocab)
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # [n, 2k]
        origins, words = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        top_list = top_scores.tolist()
        new_scores, new_rows, new_words, keep_images = [], [], [], []
        for j in range(n):
            image, chosen = images[j], 0
            row_scores, row_rows, row_words = [], [], []
            for rank in range(2 * k):
                origin, word, score = origins[j][rank], words[j][rank], top_list[j][rank]
                if word == eos_id:
                    if rank < k and score > float("-inf"):
                        hypothesis = history[j * k + origin].tolist() + [eos_id]
                        finished[image].append((score / len(hypothesis) ** length_penalty, hypothesis))
                    continue
                row_scores.append(score)
                row_rows.append(j * k + origin)
                row_words.append(word)
                chosen += 1
                if chosen == k:
                    break
            if len(finished[image]) >= k:
                continue
            keep_images.append(j)
            new_scores.append(row_scores)
            new_rows.extend(row_rows)
            new_words.extend(row_words)
        if not keep_images:
            images = []
            break
        row_index = torch.tensor(new_rows, dtype=torch.long, device=device)
        stepper.select(row_index)
        history = torch.cat([history[row_index], torch.tensor(new_words, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device)
        images = [images[j] for j in keep_images]
        tokens = torch.tensor(new_words, dtype=torch.long, device=device)
    for j, image in enumerate(images):  # out of length: live beams finish as they are
        for beam in range(k):
            hypothesis = history[j * k + beam].tolist()
            score = float(scores[j, beam])
            if hypothesis and score > float("-inf"):
                finished[image].append((score / len(hypothesis) ** length_penalty, hypothesis))
    best = [max(hyps, key=lambda item: item[0])[1] if hyps else [] for hyps in finished]
    flat = torch.cat(all_layers) if all_layers else torch.zeros(0, dtype=torch.long)
    return DecodeResult(best, flat, _exit_positions(model, flat), [], simulated=policy == ORACLE,
                        catchup_layers=stepper.catchup_layers, step_layers=step_layers)


def repeated_ngram_bans(histories: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """(rows, tokens): for each history (generated tokens of a beam), the tokens that would repeat
    one of its n-grams (its last n - 1 tokens followed by the token, seen before), as index pairs."""
    rows, tokens = [], []
    for row, history in enumerate(histories):
        if len(history) < n - 1:
            continue
        tail = tuple(history[len(history) - n + 1:]) if n > 1 else ()
        seen = {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == tail}
        rows.extend([row] * len(seen))
        tokens.extend(sorted(seen))
    return rows, tokens
