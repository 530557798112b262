#!/usr/bin/env python
"""The full model's caption scores on the dev split (the recipe's calibration split) for several
beam sizes and length penalties: choose the decoding on dev, then set evaluate.beam_size and
evaluate.length_penalty in the recipe (never choose on test).

    python tools/beam_settings.py outputs/f8k_lr_drop --beams 5 --penalties 0 0.5 1 1.5 2 [--no-repeat 0 3]

Score = hypothesis log-probability / length ** penalty (0 favours short captions, larger values
longer ones). A frozen encoder's features come from the feature cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.errors import MMExitError  # noqa: E402
from mmexit.evaluation.caption_eval import captions_of, decode  # noqa: E402
from mmexit.evaluation.caption_metrics import CaptionScorer  # noqa: E402
from mmexit.serve.caption_run import item_features, load_full_caption_run  # noqa: E402

SHOWN = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "distinct_captions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained captioning run folder")
    parser.add_argument("--beams", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--no-repeat", type=int, nargs="+", default=[0],
                        help="no-repeat n-gram sizes (evaluate.no_repeat_ngram; 0: off)")
    parser.add_argument("--images", type=int, default=None, help="the first N dev photos (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_full_caption_run(args.run_dir, "beam settings are for captioning runs")
    except MMExitError as error:
        print(f"beam_settings: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    items = loaded.splits["calib"][:args.images]
    features = item_features(model, recipe, items)
    scorer = CaptionScorer({item.image_id: item.captions for item in items})
    print(f"{len(items)} dev photos, full model, `{args.run_dir}`\n")
    print("| beam | length penalty | no-repeat n-gram | " + " | ".join(SHOWN) + " | s |")
    print("|---|---|---|" + "---|" * (len(SHOWN) + 1))
    for beam, penalty, no_repeat in [(b, p, n) for b in args.beams for p in args.penalties for n in args.no_repeat]:
        evaluate = dict(recipe["evaluate"], decoding="beam", beam_size=beam, length_penalty=penalty,
                        no_repeat_ngram=no_repeat)
        start = time.perf_counter()
        with torch.inference_mode():
            result = decode(model, features, None, evaluate, args.batch_size, tokenizer)
        seconds = time.perf_counter() - start
        scores = scorer.score(captions_of(result, items, tokenizer))
        cells = [f"{scores[m]:.3f}" if m in scores and m != "distinct_captions" else str(scores.get(m, "-"))
                 for m in SHOWN]
        print(f"| {beam} | {penalty:g} | {no_repeat} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
