#!/usr/bin/env python
"""Exact self-speculative caption decoding on a trained captioning run, against full greedy decoding.

    python tools/bench_caption_speculative.py RUN_DIR [--images 16] [--draft-layers 12 18 24]
                                              [--draft-tokens 2 3 4] [--repeats 2] [--threads 1] [--json]

Loads the run (``mmexit.load``), encodes the first ``--images`` images of its test split, then
decodes each image alone (batch 1): full greedy decoding through mmexit's KV cache, and
self-speculative decoding for every (draft layer E, draft length k): layers 1..E + exit E's head
draft k tokens, layers E+1..L verify them in one pass (``mmexit.inference.speculative``). Prints per
candidate whether every caption equals full greedy's, the acceptance rate, tokens per round, the
median seconds (candidates alternate per repeat) and the speed-up against full greedy. The draft
layers must be internal exits of the run's model.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--draft-layers", type=int, nargs="+")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
