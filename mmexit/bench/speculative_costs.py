"""``mmexit bench speculative RUN --costs``: a round's parts timed on this machine and what the cost
model (``mmexit.inference.speculative_cost``) predicts from them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Optional

import torch

from mmexit.evaluation.timing import time_alternating
from mmexit.inference.speculative_cost import PartCosts, acceptance_needed, predicted_speedup
from mmexit.models.kv_cache import DecoderCache


def median_seconds(function: Callable[[], object], repeats: int = 7, calls: int = 20) -> float:
    """Median over ``repeats`` samples of ``calls`` back-to-back calls: seconds per call (after 3 warm-ups)."""
    return time_alternating({"part": function}, repeats=repeats, warmup=3, calls=calls)["part"]


def measure_part_costs(model, features: torch.Tensor, max_len: int, draft_layer: int, chunk_lengths: list[int],
                       draft_vocabulary: Optional[torch.Tensor] = None) -> PartCosts:
    """Time a round's parts (``speculative_cost.PartCosts``), each layer cost measured as decoding
    meets it, layer after layer (a layer timed alone finds its weights in cache and runs ~2x faster
    on this CPU): one layer at one position (a pass over all L layers, per layer), one layer over n
    positions for every n in ``chunk_lengths`` (a pass over the verify layers E+1..L, per layer),
    exit E's head (over ``draft_vocabulary`` when given) and the final head on one and n rows, and
    the prefill of one image's prefix. features [1, ...]: one image."""
    adapter, layers = model.adapter, model.num_layers
    cache = DecoderCache(adapter, features, max_len)
    position = cache.offset + max_len // 2
    hidden = model.embed(torch.tensor([1]), torch.tensor(0))  # [1, width]

    def steps(first: int, last: int) -> torch.Tensor:
        state = hidden
        for index in range(first, last):
            state = adapter.step(index, state, cache, None, position)
        return state

    def spans(chunk: torch.Tensor) -> torch.Tensor:
        for index in range(draft_layer, layers):
            chunk = adapter.span(index, chunk, cache, None, position - chunk.shape[1])
        return chunk

    step = median_seconds(lambda: steps(0, layers), calls=3) / layers
    span = {n: median_seconds(lambda n=n: spans(hidden[None].expand(1, n, -1).contiguous()), calls=3)
            / (layers - draft_layer) for n in sorted(set(chunk_lengths) | {1})}
    draft_exit, last_exit = list(model.exits).index(draft_layer), model.num_exits - 1
    if draft_vocabulary is None:
        def draft_logits(state: torch.Tensor) -> torch.Tensor:
            return model.exit_logits(draft_exit, state)
    else:
        def draft_logits(state: torch.Tensor) -> torch.Tensor:
            return model.exit_scores(draft_exit, state, draft_vocabulary)
    draft_head = median_seconds(lambda: draft_logits(hidden).argmax(-1))
    final_head = {n: median_seconds(lambda n=n: model.exit_logits(last_exit, hidden.expand(n, -1)).argmax(-1))
                  for n in span}
    prefill = median_seconds(lambda: DecoderCache(adapter, features, max_len), repeats=3, calls=3)

    def draft_token():  # the draft loop's body for one token (``speculative._decode_row``)
        model.embed(torch.tensor([1]), torch.tensor(max_len // 2))
        return int(draft_logits(steps(0, draft_layer)).argmax(-1))

    # a pass over layers 1..E costs about E x step; what is left is the loop's own work
    draft_overhead = max(0.0, median_seconds(draft_token, calls=3) - draft_layer * step - draft_head)
    return PartCosts(layers, step, span, draft_head, final_head, prefill, draft_overhead=draft_overhead)


def add_cost_model(rows: list[dict], results: dict, model, features: torch.Tensor, max_len: int, target: float,
                   reference: list[list[int]], draft_vocabulary: Optional[torch.Tensor] = None) -> None:
    """Add the cost model's predicted speed-up, ceiling and acceptance needed for ``target`` to every
    speculative row (parts timed once per draft layer, on the first image). The per-step overhead of
    full decoding is what its measured seconds (rows[0]) leave after prefill, layers and head; the
    draft loop's is timed on its own. Rows that stop drafting early (``conf``) draft fewer than k
    tokens a round, which the model does not describe: they get no prediction."""
    costs_by_layer = {}
    chunk_lengths = sorted({result.draft_tokens for result in results.values()})
    reference_tokens = sum(len(tokens) for tokens in reference)
    for row in rows[1:]:
        result = results[row["decoder"]]
        layer, k = result.draft_layer, result.draft_tokens
        if " conf " in row["decoder"]:
            row["predicted_speedup"] = row["ceiling_speedup"] = row["acceptance_needed"] = None
            continue
        if layer not in costs_by_layer:
            costs = measure_part_costs(model, features[:1], max_len, layer, chunk_lengths, draft_vocabulary)
            per_token = (rows[0]["seconds"] - len(reference) * costs.prefill) / reference_tokens
            costs_by_layer[layer] = replace(costs, full_overhead=max(0.0, per_token - costs.full_token()))
        costs = costs_by_layer[layer]
        length = sum(len(tokens) for tokens in result.tokens) / len(result.tokens)
        row["predicted_speedup"] = predicted_speedup(costs, layer, k, result.tokens_per_round, length)
        row["ceiling_speedup"] = predicted_speedup(costs, layer, k, float(k), length)
        row["acceptance_needed"] = acceptance_needed(costs, layer, k, target, length)
        row["part_costs_ms"] = {"step": 1e3 * costs.step, "span": {n: 1e3 * v for n, v in costs.span.items()},
                                "draft_head": 1e3 * costs.draft_head,
                                "final_head": {n: 1e3 * v for n, v in costs.final_head.items()},
                                "prefill": 1e3 * costs.prefill, "full_overhead": 1e3 * costs.full_overhead,
                                "draft_overhead": 1e3 * costs.draft_overhead}


def print_cost_model(rows: list[dict], target: float) -> None:
    """The cost model's table under the measured one."""
    print("\nCost model (mmexit.inference.speculative_cost; parts timed on this machine, prefill included):")
    print(f"| decoder | predicted at measured tokens / round | measured | ceiling (every draft accepted) "
          f"| per-token acceptance for {target}x |")
    print("|---|---|---|---|---|")
    for row in rows[1:]:
        if row["predicted_speedup"] is None:
            print(f"| {row['decoder']} | - | {row['speedup']:.2f} | - | - |")
            continue
        needed = "unreachable" if row["acceptance_needed"] is None else f"{row['acceptance_needed']:.2f}"
        print(f"| {row['decoder']} | {row['predicted_speedup']:.2f} | {row['speedup']:.2f} "
              f"| {row['ceiling_speedup']:.2f} | {needed} |")
    timed = [row for row in rows[1:] if row.get("part_costs_ms")]
    if timed:
        print(f"parts (ms): {json.dumps(timed[0]['part_costs_ms'])}")
