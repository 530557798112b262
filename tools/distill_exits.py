#!/usr/bin/env python
"""Distil a captioning run's internal exits toward its full model (for self-speculative drafts)
and write the result as a new run folder; the full model's weights are unchanged.

    python tools/distill_exits.py outputs/flickr8k_dinov2-s_smollm2 outputs/flickr8k_smollm2_distilled \
        --images 3000 --held-out 300 --epochs 4

The full model captions ``--images`` training photos greedily; every internal exit's own module
(``model.exit_head`` adapter or norm) is then trained toward those tokens, teacher-forced
(``mmexit.training.exit_distillation``), keeping the epoch with the best agreement on the
full model's captions of ``--held-out`` dev photos. OUT gets the new model and the run's recipe, pointed at OUT with
``run.stages: [calibrate, evaluate, report]``: the calibration is not copied (the exits changed), so
``python tools/run.py OUT/recipe.yaml`` calibrates and evaluates the early-exit rules again.
``distill_exits.json`` in OUT records the agreement per exit before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.errors import MMExitError  # noqa: E402
from mmexit.inference.search import greedy_decode  # noqa: E402
from mmexit.models.captioner import save_captioner  # noqa: E402
from mmexit.recipe.loading import save_recipe  # noqa: E402
from mmexit.serve.caption_run import item_features, load_full_caption_run  # noqa: E402
from mmexit.training.exit_distillation import distill_exits, exit_states  # noqa: E402


def greedy_states(model, tokenizer, recipe: dict, items, batch_size: int):
    """The full model's greedy captions of ``items`` and the exits' teacher-forced states on them."""
    features = item_features(model, recipe, items)  # [N, P, width], projected in inference mode
    with torch.inference_mode():
        tokens = []
        for start in range(0, features.shape[0], batch_size):
            tokens += greedy_decode(model, features[start:start + batch_size], None, recipe["evaluate"]["max_len"],
                                    tokenizer.bos_id, tokenizer.eos_id).tokens
    return exit_states(model, features, tokens, tokenizer.bos_id, tokenizer.pad_id, batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a trained captioning run folder")
    parser.add_argument("out_dir", help="the new run folder (must not exist)")
    parser.add_argument("--images", type=int, default=3000, help="training photos the full model captions")
    parser.add_argument("--held-out", type=int, default=300, help="dev photos for the agreement check")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="decoding / teacher-forcing batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    try:
        if out.exists():
            raise MMExitError(f"{out}: exists (choose a new folder; nothing is written over a run)")
        loaded = load_full_caption_run(args.run_dir, "exit distillation is for captioning runs")
    except MMExitError as error:
        print(f"distill_exits: error: {error}", file=sys.stderr)
        return 2
    model, tokenizer, recipe = loaded.model, loaded.tokenizer, loaded.recipe
    train_items, held_items = loaded.splits["train"][:args.images], loaded.splits["calib"][:args.held_out]
    start = time.perf_counter()
    train = greedy_states(model, tokenizer, recipe, train_items, args.batch_size)
    held = greedy_states(model, tokenizer, recipe, held_items, args.batch_size)
    states_s = time.perf_counter() - start
    print(f"{train.targets.numel()} training positions ({len(train_items)} photos), {held.targets.numel()} held-out "
          f"({len(held_items)} dev photos): {states_s:.0f} s", flush=True)
    start = time.perf_counter()
    try:
        log = distill_exits(model, train, held, args.epochs, args.lr)
    except (MMExitError, ValueError) as error:
        print(f"distill_exits: error: {error}", file=sys.stderr)
        return 2
    train_s = time.perf_counter() - start
    internal = model.exits[:-1]
    print("| exit layer | held-out agreement before | after each epoch | kept epoch |")
    print("|---|---|---|---|")
    for layer, history, kept in zip(internal, log.held_out, log.kept_epoch):
        print(f"| {layer} | {history[0]:.3f} | {' / '.join(f'{a:.3f}' for a in history[1:])} | {kept} |")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_captioner(model, staging / "model")
    source = Path(args.run_dir)
    for extra in ("tokenizer.json",):
        if (source / "model" / extra).is_file():
            shutil.copy2(source / "model" / extra, staging / "model" / extra)
    run = dict(recipe["run"], output_dir=str(out), name=out.name, stages=["calibrate", "evaluate", "report"])
    save_recipe(dict(recipe, run=run), staging / "recipe.yaml")  # recalibrate: tools/run.py OUT/recipe.yaml
    report = {"source": str(source), "images": len(train_items), "held_out_images": len(held_items),
              "train_positions": int(train.targets.numel()), "held_out_positions": int(held.targets.numel()),
              "epochs": args.epochs, "lr": args.lr, "exit_layers": internal,
              "held_out_agreement": log.held_out, "kept_epoch": log.kept_epoch,
              "states_seconds": round(states_s, 1), "train_seconds": round(train_s, 1)}
    (staging / "distill_exits.json").write_text(json.dumps(report, indent=2))
    staging.rename(out)
    print(f"distill_exits: wrote {out} (states {states_s:.0f} s, training {train_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
