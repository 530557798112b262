#!/usr/bin/env python
"""Step-synchronous against layer-level continuous caption decoding, on the same images and rule.

    python tools/bench_caption_continuous.py RUN_DIR [--rule NAME@VALUE] [--images 64] [--rows 16]
                                             [--max-call 16] [--max-len N] [--max-wait CALLS] [--depth-bias 1] [--catch-up 1]
                                             [--restart-weight 0.5] [--device cpu]
                                             [--repeats 3] [--threads 1] [--json]
    python tools/bench_caption_continuous.py --random [--family gpt2|llama] [--width 64 --layers 6 --heads 4]
                                             [--vocab 50] [--rule maxprob@0.5] ...

RUN_DIR: a trained captioning run (``mmexit.load``; its first ``--images`` test images, its rule at
its chosen operating point unless ``--rule``, its ``evaluate.max_len`` unless ``--max-len``).
``--random`` (or RUN_DIR ``random``): a tiny random captioner built in code (seconds; a smoke test),
random images. Greedy decoding, ``propagate`` K/V policy, four decoders:
- ``step-sync full``: ``greedy_decode(rule=None)`` in batches of ``--max-call`` (default ``--rows``; the baseline);
- ``step-sync exit``: ``greedy_decode(rule)`` in the same batches (a step waits for its deepest row);
- ``continuous full`` / ``continuous exit``: ``ContinuousDecoder`` with ``--rows`` slots (each row at
  its own step; one call runs a layer for the tokens waiting there, at most ``--max-call`` of them:
  ``--rows 64 --max-call 16`` is a pool deeper than a call, saturation at the same largest call).
Prints per decoder: median seconds (decoders alternate per repeat), captions per second, decoder-layer calls, rows per
call, milliseconds per call (seconds / calls), row-layer speed-up (layers a token runs under the
full model / mean layers run per token), wall-clock speed-up against ``step-sync full``, efficiency
(wall / row-layer speed-up) and how many captions equal ``step-sync exit``'s (the continuous
decoder equals greedy decoding of each image alone; a batch of ``--rows`` may differ from that by
float noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mmexit.evaluation.timing import machine_info, time_alternating  # noqa: E402
from mmexit.exits.base import ExitRule  # noqa: E402
from mmexit.inference.continuous_decoder import ContinuousDecoder, captions_to_result  # noqa: E402
from mmexit.inference.scheduler import SchedulerSettings  # noqa: E402
from mmexit.inference.search import DecodeResult, greedy_decode  # noqa: E402


def random_captioner(family: str, width: int, layers: int, heads: int, vocab: int, init: float):
    """A random captioner built in code (4 patches of a 32x32 image), EOS = 2; (model, image size)."""
    from mmexit.models.captioner import build_captioner

    if family == "llama":
        decoder = {"type": "llama", "config": {"hidden_size": width, "intermediate_size": 2 * width,
                                               "num_hidden_layers": layers, "num_attention_heads": heads,
                                               "num_key_value_heads": max(1, heads // 2), "max_position_embeddings": 256,
                                               "initializer_range": init,
                                               "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}}
    else:
        decoder = {"config": {"n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": 256,
                              "initializer_range": init}}
    spec = {"encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                        "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}},
            "decoder": decoder, "vocab_size": vocab, "special_ids": {"bos": 1, "eos": 2, "pad": 0},
            "exits": "all", "exit_head": "shared"}
    return build_captioner(spec).eval(), 32


def rule_from_text(text: str) -> Optional[ExitRule]:
    """'NAME@VALUE' -> the rule at that threshold (uncalibrated); 'full' -> None."""
    from mmexit.recipe.language import build_component

    if text == "full":
        return None
    name, _, value = text.partition("@")
    spec = {"name": name} if not value else {"name": name, "threshold": float(value)}
    return build_component(spec, "rule", "rule")


def load_run(run_dir: str, rule: Optional[str], images: int, device: Optional[str]):
    """(model, features [images, patches, width], rule, max_len, bos, eos, label) of a trained run."""
    import mmexit
    from bench_caption_speculative import image_args, test_images
    from mmexit.serve.caption_predictor import open_image

    predictor = mmexit.load(run_dir, rule=rule, device=device)
    paths = test_images(Path(run_dir), predictor.recipe, images)
    pixels = torch.stack([open_image(path, i, *image_args(predictor.recipe)) for i, path in enumerate(paths)])
    model = predictor.model
    with torch.inference_mode():
        features = model.encode(pixels.to(next(model.parameters()).device))
    chosen = None if predictor.operating_point == "full" else predictor.rule
    tokenizer = predictor.processor
    return (model, features, chosen, predictor.recipe["evaluate"]["max_len"], tokenizer.bos_id, tokenizer.eos_id,
            f"{run_dir} ({predictor.operating_point})")


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
    """The continuous decoder with ``rows`` slots and the ``scheduler`` settings: (its captions,
    decoder-layer calls)."""
    decoder = ContinuousDecoder(model, rule, max_len, rows, bos, eos, scheduler=scheduler)
    ids = decoder.submit(features)
    captions = decoder.run()
    return captions_to_result(model, [captions[i] for i in ids]), decoder.calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a trained captioning run folder, or 'random'")
    parser.add_argument("--random", action="store_true", help="a tiny random captioner built in code")
    parser.add_argument("--family", choices=["gpt2", "llama"], default="gpt2", help="--random: the decoder")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--init", type=float, default=0.3, help="--random: initializer_range (peaked logits)")
    parser.add_argument("--rule", default=None, help="NAME@VALUE (default: the run's; --random: maxprob@0.5)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16, help="batch rows (step-sync) = slots (continuous)")
    parser.add_argument("--max-len", type=int, default=None, help="default: the run's evaluate.max_len; --random 20")
    parser.add_argument("--max-call", type=int, default=None,
                        help="the most tokens one layer call takes (default: --rows); with --rows 64 --max-call 16 the "
                             "continuous pool is deeper than a call, and step-sync decodes in batches of 16")
    parser.add_argument("--max-wait", type=int, default=None, help="age bound in layer calls (default: 2 x layers)")
    parser.add_argument("--depth-bias", type=float, default=1.0, help="scheduler preference for deeper queues")
    parser.add_argument("--catch-up", type=float, default=1.0,
                        help="scheduler weight of the tokens one layer deeper (that a call's tokens join)")
    parser.add_argument("--restart-weight", type=float, default=0.5, help="scheduler weight of the layer-0 queue")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: a run's default device; --random: cpu)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.random or args.run_dir in (None, "random"):
        torch.manual_seed(0)
        model, size = random_captioner(args.family, args.width, args.layers, args.heads, args.vocab, args.init)
        model = model.to(args.device or "cpu")
        with torch.inference_mode():
            features = model.encode(torch.randn(args.images, 3, size, size, device=args.device or "cpu"))
        rule = rule_from_text(args.rule or "maxprob@0.5")
        max_len, bos, eos = args.max_len or 20, 1, 2
        label = f"random {args.family} decoder {args.layers}x{args.width}, vocab {args.vocab}"
    else:
        from mmexit.errors import MMExitError

        try:
            model, features, rule, max_len, bos, eos, label = load_run(args.run_dir, args.rule, args.images, args.device)
        except MMExitError as error:
            print(f"mmexit: error: {error}", file=sys.stderr)
            return 2
        max_len = args.max_len or max_len

    try:
        scheduler = SchedulerSettings(args.max_wait, args.depth_bias, args.catch_up, args.restart_weight, args.max_call)
    except ValueError as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return 2
    batch = args.max_call or args.rows  # the same largest call for both decoders
    decoders: dict[str, Callable[[], tuple[DecodeResult, int]]] = {
        "step-sync full": lambda: step_sync(model, features, None, batch, max_len, bos, eos),
        "step-sync exit": lambda: step_sync(model, features, rule, batch, max_len, bos, eos),
        "continuous full": lambda: continuous(model, features, None, args.rows, max_len, bos, eos, scheduler),
        "continuous exit": lambda: continuous(model, features, rule, args.rows, max_len, bos, eos, scheduler),
    }
    with torch.inference_mode():
        outputs = {name: decode() for name, decode in decoders.items()}
    seconds = time_alternating(decoders, repeats=args.repeats, warmup=0)
    base, reference = seconds["step-sync full"], outputs["step-sync exit"][0].tokens
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
            "rule": rule.describe() if rule is not None else "full", "images": int(features.shape[0]),
            "rows": args.rows, "max_len": max_len, **asdict(scheduler), "threads": args.threads,
            "repeats": args.repeats}
    if args.json:
        print(json.dumps({**info, "rows_table": rows}, indent=2))
        return 0
    print(json.dumps(info))
    print("| decoder | seconds | captions / s | tokens | layer calls | rows / call | ms / call | row-layer x | wall x "
          "| efficiency | captions = step-sync exit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['decoder']} | {row['seconds']:.3f} | {row['captions_per_s']:.1f} | {row['tokens']} "
              f"| {row['layer_calls']} "
              f"| {row['rows_per_call']:.1f} | {row['ms_per_call']:.2f} | {row['row_layer_speedup']:.2f} "
              f"| {row['wall_speedup']:.2f} "
              f"| {row['efficiency']:.2f} | {row['same_captions']}/{len(reference)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
