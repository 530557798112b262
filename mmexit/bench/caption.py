"""``mmexit bench caption``: step-synchronous against layer-level continuous caption decoding.

    mmexit bench caption RUN|random [--rule SPEC] [--decoders step-sync continuous] [--images 64] [--rows 16]
        [--max-call 16] [--max-len N] [--max-wait-calls N] [--depth-bias 1] [--catch-up 1] [--restart-weight 0.5]
        [--device cpu] [--repeats 3] [--threads 1] [--json]
    mmexit bench caption RUN|random --patterns [--exit K] [--steps 20] [--batch-sizes 16 1] ...

RUN: a trained captioning run (its first ``--images`` test images, its rule at its chosen operating
point unless ``--rule``, its ``evaluate.max_len`` unless ``--max-len``), or ``random``: a tiny
random captioner built in code (random images; ``--rule`` default maxprob@0.5). Greedy decoding,
``propagate`` K/V policy, four decoders:
- ``step-sync full``: ``greedy_decode(rule=None)`` in batches of ``--max-call`` (default ``--rows``; the baseline);
- ``step-sync exit``: ``greedy_decode(rule)`` in the same batches (a step waits for its deepest row);
- ``continuous full`` / ``continuous exit``: ``ContinuousDecoder`` with ``--rows`` slots (each row at
  its own step; one call runs a layer for the tokens waiting there, at most ``--max-call`` of them:
  ``--rows 64 --max-call 16`` is a pool deeper than a call, saturation at the same largest call).
Prints per decoder: median seconds (decoders alternate per repeat), captions per second, decoder-layer
calls, rows per call, milliseconds per call, row-layer speed-up (layers a token runs under the full
model / mean layers run per token), wall-clock speed-up against ``step-sync full``, efficiency
(wall / row-layer speed-up) and how many captions equal ``step-sync exit``'s. ``--patterns``: fixed
exit patterns instead of a rule (``mmexit.bench.caption_patterns``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Callable

import torch

from mmexit.bench import caption_patterns
from mmexit.bench.captioners import RANDOM, add_random_arguments, load_caption_run, random_from_args, random_rule
from mmexit.errors import RecipeError
from mmexit.evaluation.timing import machine_info, time_alternating
from mmexit.inference.continuous_decoder import ContinuousDecoder, captions_to_result
from mmexit.inference.scheduler import SchedulerSettings
from mmexit.inference.search import DecodeResult, greedy_decode

DECODERS = ("step-sync", "continuous")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a trained captioning run folder (or its model/ folder), or 'random'")
    parser.add_argument("--rule", help="rule spec: an operating point of the run, NAME, NAME@VALUE or full "
                                       "(default: the run's chosen point; random: maxprob@0.5)")
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS),
                        help="decoders timed against the step-synchronous full model (default: both)")
    parser.add_argument("--images", type=int, help="images decoded (default 64; --patterns 32)")
    parser.add_argument("--rows", type=int, default=16, help="batch rows (step-sync) = slots (continuous)")
    parser.add_argument("--max-len", type=int, help="default: the run's evaluate.max_len; random: 20")
    parser.add_argument("--max-call", type=int, help="the most tokens one layer call takes (default: --rows); with "
                        "--rows 64 --max-call 16 the continuous pool is deeper than a call, step-sync decodes in 16s")
    parser.add_argument("--max-wait-calls", type=int, help="scheduler age bound in layer calls (default: 2 x layers)")
    parser.add_argument("--depth-bias", type=float, default=1.0, help="scheduler preference for deeper queues")
    parser.add_argument("--catch-up", type=float, default=1.0,
                        help="scheduler weight of the tokens one layer deeper (that a call's tokens join)")
    parser.add_argument("--restart-weight", type=float, default=0.5, help="scheduler weight of the layer-0 queue")
    parser.add_argument("--device", help="cpu, cuda (default: the run's default device; random: cpu)")
    parser.add_argument("--repeats", type=int, help="timed repeats, median taken (default 3; --patterns 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1; --patterns: torch's default)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    add_random_arguments(parser)
    caption_patterns.add_arguments(parser.add_argument_group(
        "--patterns: fixed exit patterns (never, fixed@k, alternate@k, parity@k) instead of a rule"))


def step_sync(model, features, rule, rows: int, max_len: int, bos: int, eos: int) -> tuple[DecodeResult, int]:
    """greedy_decode in batches of ``rows``: (the captions as one result, decoder-layer calls)."""
    results = [greedy_decode(model, features[s:s + rows], rule, max_len, bos, eos, "propagate")
               for s in range(0, features.shape[0], rows)]
    tokens = [row for result in results for row in result.tokens]
    layers = [row for result in results for row in result.token_layers]
    flat = torch.cat([result.layers for result in results])
    merged = DecodeResult(tokens, flat, torch.cat([result.exit_index for result in results]), layers)
    return merged, sum(sum(result.step_layers) for result in results)


def continuous(model, features, rule, rows: int, max_len: int, bos: int, eos: int, scheduler: SchedulerSettings
               ) -> tuple[DecodeResult, int]:
    """The continuous decoder with ``rows`` slots: (its captions, decoder-layer calls)."""
    decoder = ContinuousDecoder(model, rule, max_len, rows, bos, eos, scheduler=scheduler)
    ids = decoder.submit(features)
    captions = decoder.run()
    return captions_to_result(model, [captions[i] for i in ids]), decoder.calls


def run(args: argparse.Namespace) -> int:
    if args.patterns:
        return caption_patterns.run(args)
    torch.set_num_threads(args.threads or 1)
    images, repeats = args.images or 64, args.repeats or 3
    if args.run == RANDOM:
        model, size, label = random_from_args(args)
        model = model.to(args.device or "cpu")
        with torch.inference_mode():
            features = model.encode(torch.randn(images, 3, size, size, device=args.device or "cpu"))
        rule, key = random_rule(args.rule)
        max_len, bos, eos = args.max_len or 20, 1, 2
    else:
        loaded = load_caption_run(args.run, args.rule, images, args.device)
        model, features, rule, key, label = loaded.model, loaded.features, loaded.rule, loaded.key, loaded.label
        max_len, bos, eos = args.max_len or loaded.max_len, loaded.bos, loaded.eos
    try:
        scheduler = SchedulerSettings(max_wait=args.max_wait_calls, depth_bias=args.depth_bias, catch_up=args.catch_up,
                                      restart_weight=args.restart_weight, max_call=args.max_call)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    batch = args.max_call or args.rows  # the same largest call for both decoders
    decoders: dict[str, Callable[[], tuple[DecodeResult, int]]] = {
        "step-sync full": lambda: step_sync(model, features, None, batch, max_len, bos, eos)}
    if "step-sync" in args.decoders:
        decoders["step-sync exit"] = lambda: step_sync(model, features, rule, batch, max_len, bos, eos)
    if "continuous" in args.decoders:
        decoders["continuous full"] = lambda: continuous(model, features, None, args.rows, max_len, bos, eos, scheduler)
        decoders["continuous exit"] = lambda: continuous(model, features, rule, args.rows, max_len, bos, eos, scheduler)
    with torch.inference_mode():
        outputs = {name: decode() for name, decode in decoders.items()}
    seconds = time_alternating(decoders, repeats=repeats, warmup=0)
    base = seconds["step-sync full"]
    reference = outputs.get("step-sync exit", outputs["step-sync full"])[0].tokens
    rows = []
    for name, (result, calls) in outputs.items():
        tokens = result.layers.numel()
        layer_x = model.num_layers * tokens / float(result.layers.sum())
        wall_x = base / seconds[name]
        rows.append({"decoder": name, "seconds": seconds[name], "tokens": tokens, "layer_calls": calls,
                     "rows_per_call": float(result.layers.sum()) / calls, "ms_per_call": 1e3 * seconds[name] / calls,
                     "row_layer_speedup": layer_x, "captions_per_s": features.shape[0] / seconds[name],
                     "wall_speedup": wall_x, "efficiency": wall_x / layer_x,
                     "same_captions": sum(a == b for a, b in zip(result.tokens, reference))})
    info = {"model": label, "machine": machine_info(), "layers": model.num_layers, "exits": model.exits,
            "rule": key, "images": int(features.shape[0]), "rows": args.rows, "max_len": max_len,
            **asdict(scheduler), "threads": torch.get_num_threads(), "repeats": repeats}
    if args.json:
        print(json.dumps({**info, "rows_table": rows}, indent=2))
        return 0
    same = "step-sync exit" if "step-sync exit" in outputs else "step-sync full"
    print(json.dumps(info))
    print("| decoder | seconds | captions / s | tokens | layer calls | rows / call | ms / call | row-layer x | wall x "
          f"| efficiency | captions = {same} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['decoder']} | {row['seconds']:.3f} | {row['captions_per_s']:.1f} | {row['tokens']} "
              f"| {row['layer_calls']} | {row['rows_per_call']:.1f} | {row['ms_per_call']:.2f} "
              f"| {row['row_layer_speedup']:.2f} | {row['wall_speedup']:.2f} | {row['efficiency']:.2f} "
              f"| {row['same_captions']}/{len(reference)} |")
    return 0
