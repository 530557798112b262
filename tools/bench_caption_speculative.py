#!/usr/bin/env python
"""Exact self-speculative caption decoding on a trained captioning run, against full greedy decoding.

    python tools/bench_caption_speculative.py RUN_DIR [--images 16] [--draft-layers 12 18 24]
                                              [--draft-tokens 2 3 4] [--repeats 2] [--threads 1] [--costs]
                                              [--target 1.3] [--json]

Loads the run (``mmexit.load``), encodes the first ``--images`` images of its test split, then
decodes each image alone (batch 1): full greedy decoding through mmexit's KV cache, and
self-speculative decoding for every (draft layer E, draft length k): layers 1..E + exit E's head
draft k tokens, layers E+1..L verify them in one pass (``mmexit.inference.speculative``). Prints per
candidate whether every caption equals full greedy's, the acceptance rate, tokens per round, the
median seconds (candidates alternate per repeat) and the speed-up against full greedy. The draft
layers must be internal exits of the run's model.

``--costs`` also times the parts of a round on this machine (one layer at one position, one layer
over n positions, the exit heads, the prefix's prefill) and prints, per candidate, the speed-up
the cost model of ``mmexit.inference.speculative_cost`` predicts at the measured tokens per round
(beside the measured one), its ceiling when every draft is accepted, and the per-token acceptance
needed for ``--target`` (default 1.3x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def test_images(run_dir: Path, recipe: dict, count: int) -> list[Path]:
    """The first ``count`` images of the run's test split (COCO, Karpathy or generated scenes), in
    the evaluation's order."""
    from mmexit.tasks.captioning import load_splits

    return [item.path for item in load_splits(recipe)["test"][:count]]


def image_args(recipe: dict) -> tuple:
    model = recipe["model"]
    return model["image_size"], tuple(model["image_mean"]), tuple(model["image_std"])


def _median_seconds(fn, repeats: int = 7, inner: int = 20) -> float:
    """Median over ``repeats`` batches of ``inner`` calls of fn's seconds per call (after a warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def measure_part_costs(model, features: torch.Tensor, max_len: int, draft_layer: int, chunk_lengths: list[int]):
    """Time a round's parts on this machine (``speculative_cost.PartCosts``), each layer cost
    measured as decoding meets it, layer after layer (a layer timed alone finds its weights in
    cache and runs ~2x faster on this CPU): one layer at one position (a pass over all L layers,
    per layer), one layer over n positions for every n in ``chunk_lengths`` (a pass over the verify
    layers E+1..L, per layer), exit E's head and the final head on one and n rows, and the prefill
    of one image's prefix. features [1, ...]: one image."""
    from mmexit.models.kv_cache import DecoderCache
    from mmexit.inference.speculative_cost import PartCosts

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

    step = _median_seconds(lambda: steps(0, layers), inner=3) / layers
    span = {n: _median_seconds(lambda n=n: spans(hidden[None].expand(1, n, -1).contiguous()), inner=3)
            / (layers - draft_layer) for n in sorted(set(chunk_lengths) | {1})}
    draft_exit, last_exit = list(model.exits).index(draft_layer), model.num_exits - 1
    draft_head = _median_seconds(lambda: model.exit_logits(draft_exit, hidden).argmax(-1))
    final_head = {n: _median_seconds(lambda n=n: model.exit_logits(last_exit, hidden.expand(n, -1)).argmax(-1))
                  for n in span}
    prefill = _median_seconds(lambda: DecoderCache(adapter, features, max_len), repeats=3, inner=3)

    def draft_token():  # the draft loop's body for one token (``speculative._decode_row``)
        model.embed(torch.tensor([1]), torch.tensor(max_len // 2))
        return int(model.exit_logits(draft_exit, steps(0, draft_layer)).argmax(-1))

    # a pass over layers 1..E costs about E x step; what is left is the loop's own work
    draft_overhead = max(0.0, _median_seconds(draft_token, inner=3) - draft_layer * step - draft_head)
    return PartCosts(layers, step, span, draft_head, final_head, prefill, draft_overhead=draft_overhead)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--draft-layers", type=int, nargs="+")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--costs", action="store_true", help="time a round's parts and print the cost model")
    parser.add_argument("--target", type=float, default=1.3, help="speed-up whose acceptance --costs reports")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import mmexit
    from mmexit.errors import MMExitError
    from mmexit.evaluation.timing import machine_info, time_alternating
    from mmexit.inference.search import greedy_decode
    from mmexit.inference.speculative import speculative_decode
    from mmexit.serve.caption_predictor import open_image

    try:
        predictor = mmexit.load(args.run_dir, rule="full")
        paths = test_images(Path(args.run_dir), predictor.recipe, args.images)
        pixels = torch.stack([open_image(path, i, *image_args(predictor.recipe)) for i, path in enumerate(paths)])
    except MMExitError as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer = predictor.model, predictor.processor
    max_len = predictor.recipe["evaluate"]["max_len"]
    with torch.inference_mode():
        features = model.encode(pixels)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    layers = args.draft_layers or list(model.exits[:-1])

    def full():
        return [greedy_decode(model, features[i:i + 1], None, max_len, bos, eos, "propagate").tokens[0]
                for i in range(features.shape[0])]

    with torch.inference_mode():
        reference = full()
        results, candidates = {}, {"full greedy": lambda: torch.inference_mode()(full)()}
        for layer in layers:
            for k in args.draft_tokens:
                name = f"speculative E={layer} k={k}"
                results[name] = speculative_decode(model, features, layer, k, max_len, bos, eos)
                candidates[name] = lambda layer=layer, k=k: speculative_decode(model, features, layer, k, max_len, bos, eos)
        seconds = time_alternating(candidates, repeats=args.repeats, warmup=0)
    base = seconds["full greedy"]
    rows = [{"decoder": "full greedy", "exact": True, "acceptance": None, "tokens_per_round": 1.0,
             "seconds": base, "speedup": 1.0}]
    for name, result in results.items():
        same = [a == b[:len(a)] or a[:len(b)] == b for a, b in zip(result.tokens, reference)]
        rows.append({"decoder": name, "exact": result.tokens == reference, "rows_equal": sum(same),
                     "acceptance": result.acceptance_rate, "accepted": result.accepted, "drafted": result.drafted,
                     "tokens_per_round": result.tokens_per_round, "seconds": seconds[name],
                     "speedup": base / seconds[name]})
    if args.costs:
        with torch.inference_mode():
            add_cost_model(rows, results, model, features, max_len, args.target, reference)
    info = {"machine": machine_info(), "run": args.run_dir, "images": int(features.shape[0]), "max_len": max_len,
            "layers": model.num_layers, "exits": model.exits, "threads": args.threads, "repeats": args.repeats}
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=2))
        return 0
    print(json.dumps(info))
    print("| decoder | captions = full greedy | acceptance | tokens / round | seconds | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f} ({row['accepted']}/{row['drafted']})"
        print(f"| {row['decoder']} | {'yes' if row['exact'] else 'NO'} | {acceptance} | {row['tokens_per_round']:.2f} "
              f"| {row['seconds']:.3f} | {row['speedup']:.2f} |")
    if args.costs:
        print(f"\nCost model (mmexit.inference.speculative_cost; parts timed on this machine, prefill included):")
        print(f"| decoder | predicted at measured tokens / round | measured | ceiling (every draft accepted) "
              f"| per-token acceptance for {args.target}x |")
        print("|---|---|---|---|---|")
        for row in rows[1:]:
            needed = "unreachable" if row["acceptance_needed"] is None else f"{row['acceptance_needed']:.2f}"
            print(f"| {row['decoder']} | {row['predicted_speedup']:.2f} | {row['speedup']:.2f} "
                  f"| {row['ceiling_speedup']:.2f} | {needed} |")
        costs = rows[1]["part_costs_ms"]
        print(f"parts (ms): {json.dumps(costs)}")
    return 0


def add_cost_model(rows: list[dict], results: dict, model, features: torch.Tensor, max_len: int, target: float,
                   reference: list[list[int]]) -> None:
    """Add the cost model's predicted speed-up, ceiling and acceptance needed for ``target`` to every
    speculative row (parts timed once per draft layer, on the first image). The per-step overhead
        of full decoding is what its measured seconds (rows[0]) leave after prefill, layers and head; the
    draft loop's is timed on its own."""
    from dataclasses import replace

    from mmexit.inference.speculative_cost import acceptance_needed, predicted_speedup

    costs_by_layer = {}
    chunk_lengths = sorted({result.draft_tokens for result in results.values()})
    reference_tokens = sum(len(tokens) for tokens in reference)
    for row in rows[1:]:
        result = results[row["decoder"]]
        layer, k = result.draft_layer, result.draft_tokens
        if layer not in costs_by_layer:
            costs = measure_part_costs(model, features[:1], max_len, layer, chunk_lengths)
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


if __name__ == "__main__":
    sys.exit(main())
