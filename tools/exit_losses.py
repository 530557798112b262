#!/usr/bin/env python
"""Each exit's teacher-forced loss (mean token cross-entropy, no label smoothing) of a trained
captioning run on its training photos and on held-out ones: where does depth stop helping, and
does the model over-fit?

    python tools/exit_losses.py outputs/flickr8k_10ep --images 500

Splits: train, calib (the recipe's dev/val split) and test; the first ``--images`` photos of each,
with all their reference captions. A frozen encoder's features come from the feature cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.errors import MMExitError  # noqa: E402
from mmexit.serve.caption_run import item_features, load_full_caption_run  # noqa: E402
from mmexit.training.held_out import exit_losses  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained captioning run folder")
    parser.add_argument("--splits", nargs="+", default=["train", "calib"], choices=["train", "calib", "test"])
    parser.add_argument("--images", type=int, default=500, help="the first N photos of each split")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_full_caption_run(args.run_dir, "exit losses are for captioning runs")
    except MMExitError as error:
        print(f"exit_losses: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    print("| split | photos | captions | " + " | ".join(f"exit @ {layer}" for layer in model.exits) + " |")
    print("|---|---|---|" + "---|" * model.num_exits)
    for split in args.splits:
        items = loaded.splits[split][:args.images]
        features = item_features(model, recipe, items, projected=False)
        captions = [[tokenizer.encode(text) for text in item.captions] for item in items]
        losses = exit_losses(model, features, captions, tokenizer, recipe["train"]["max_length"])
        print(f"| {split} | {len(items)} | {sum(map(len, captions))} | "
              + " | ".join(f"{float(loss):.3f}" for loss in losses) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
