"""``mmexit bench speculative``: exact self-speculative decoding against full greedy decoding, wall-clock.

    mmexit bench speculative CAPTION_RUN [--images 16] [--draft-layers 12 18 24] [--draft-tokens 2 3 4]
        [--draft-vocab 1024] [--confidence 0.3 0.5] [--repeats 2] [--threads 1] [--costs] [--target 1.3] [--json]
    mmexit bench speculative LM_FOLDER [--prompt "..."] [--new-tokens 48] [--draft-layers 8 12 15] ...

A captioning run (``mmexit.load``): its first ``--images`` test images, each decoded alone (batch 1)
by full greedy decoding through mmexit's KV cache and by self-speculative decoding for every (draft
layer E, draft length k): layers 1..E + exit E's head draft k tokens, layers E+1..L verify them in
one pass (``mmexit.inference.speculative``). The draft layers must be internal exits of the run's
model (default: all). ``--draft-vocab N``: the draft head scores only the N most frequent tokens of
the run's training captions (FR-Spec); ``--confidence C ...``: rows that also stop drafting after a
token drafted with probability below C (one row per value, beside the fixed-length rows). ``--costs`` also times a round's parts and prints the cost model's predicted
speed-up, its ceiling when every draft is accepted and the acceptance needed for ``--target``.

A local Hugging Face LLaMA-family causal LM folder (e.g. ``data/cache/smollm2-135m``): plain text
generation, batch 1, from ``--prompt``: mmexit's full greedy decoding, transformers'
``generate(do_sample=False)`` for reference, and self-speculative decoding where layers 1..E + the
final norm and LM head draft; every candidate generates exactly ``--new-tokens`` tokens (EOS
ignored). On a machine shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``.

Prints per candidate whether its tokens equal full greedy's, the acceptance rate, tokens per round,
the median seconds (candidates alternate per repeat) and the speed-up against full greedy.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from mmexit.bench.captioners import load_caption_run
from mmexit.bench.speculative_costs import add_cost_model, print_cost_model
from mmexit.errors import ModelLoadError
from mmexit.evaluation.timing import machine_info, time_alternating
from mmexit.inference.draft_vocabulary import DraftVocabulary, frequent_tokens
from mmexit.inference.search import greedy_decode
from mmexit.inference.speculative import speculative_decode
from mmexit.inference.text_generation import generate_ids
from mmexit.tasks.captioning import load_splits

PROMPT = "The history of the printing press begins in"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN|LM", help="a trained captioning run folder, or a local causal-LM folder "
                                       "(config.json; e.g. data/cache/smollm2-135m) for plain text generation")
    parser.add_argument("--draft-layers", type=int, nargs="+",
                        help="draft layers E (default: a run's internal exits; an LM: 8 12 15)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4], help="draft lengths k")
    parser.add_argument("--repeats", type=int, help="timed repeats, median taken (default: a run 2, an LM 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: a run 1, an LM 2)")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    group = parser.add_argument_group("a captioning run")
    group.add_argument("--images", type=int, default=16, help="test images, each decoded alone")
    group.add_argument("--costs", action="store_true", help="time a round's parts and print the cost model")
    group.add_argument("--target", type=float, default=1.3, help="speed-up whose acceptance --costs reports")
    group.add_argument("--draft-vocab", type=int, metavar="N",
                       help="the draft head scores only the N most frequent tokens of the training captions")
    group.add_argument("--confidence", type=float, nargs="+", default=[],
                       help="also rows that stop drafting after a token drafted with probability below C")
    group = parser.add_argument_group("a causal LM (plain text)")
    group.add_argument("--prompt", default=PROMPT)
    group.add_argument("--new-tokens", type=int, default=48, help="tokens generated (EOS ignored)")


def print_rows(rows: list[dict]) -> None:
    print("| decoder | tokens = full greedy | acceptance | tokens / round | seconds | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f} ({row['accepted']}/{row['drafted']})"
        print(f"| {row['decoder']} | {'yes' if row['exact'] else 'NO'} | {acceptance} | {row['tokens_per_round']:.2f} "
              f"| {row['seconds']:.3f} | {row['speedup']:.2f} |")


def run(args: argparse.Namespace) -> int:
    target = Path(args.run)
    if (target / "recipe.yaml").is_file() or (target.name == "model" and (target.parent / "recipe.yaml").is_file()):
        return run_caption(args)
    if (target / "config.json").is_file():
        return run_text(args)
    raise ModelLoadError(f"{target}: neither a captioning run (recipe.yaml) nor a causal-LM folder (config.json)")


def run_caption(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or 1)
    repeats = args.repeats or 2
    loaded = load_caption_run(args.run, "full", args.images)
    model, features, max_len, bos, eos = loaded.model, loaded.features, loaded.max_len, loaded.bos, loaded.eos
    layers = args.draft_layers or list(model.exits[:-1])
    vocabulary = caption_draft_vocabulary(loaded, args.draft_vocab) if args.draft_vocab else None
    draft_ids = None if vocabulary is None else vocabulary.ids

    def full():
        return [greedy_decode(model, features[i:i + 1], None, max_len, bos, eos, "propagate").tokens[0]
                for i in range(features.shape[0])]

    with torch.inference_mode():
        reference = full()
        results, candidates = {}, {"full greedy": full}
        for layer in layers:
            for k in args.draft_tokens:
                for confidence in [None, *args.confidence]:
                    name = f"speculative E={layer} k={k}" + ("" if confidence is None else f" conf {confidence:g}")

                    def decode(layer=layer, k=k, confidence=confidence):
                        return speculative_decode(model, features, layer, k, max_len, bos, eos, draft_ids, confidence)

                    results[name], candidates[name] = decode(), decode
    seconds = time_alternating(candidates, repeats=repeats, warmup=0)
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
            add_cost_model(rows, results, model, features, max_len, args.target, reference, draft_ids)
    info = {"machine": machine_info(), "run": args.run, "images": int(features.shape[0]), "max_len": max_len,
            "layers": model.num_layers, "exits": model.exits, "threads": torch.get_num_threads(), "repeats": repeats,
            "draft_vocabulary": None if vocabulary is None else
            {"size": int(vocabulary.ids.numel()), "coverage": round(vocabulary.coverage, 4)}}
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=2))
        return 0
    print(json.dumps(info))
    print_rows(rows)
    if args.costs:
        print_cost_model(rows, args.target)
    return 0


def caption_draft_vocabulary(loaded, size: int) -> DraftVocabulary:
    """The ``size`` most frequent tokens of the run's training captions (+ EOS), among its heads' tokens."""
    captions = [caption for item in load_splits(loaded.recipe)["train"] for caption in item.captions]
    return frequent_tokens(loaded.tokenizer.encode, captions, size, always=[loaded.eos],
                           allowed=getattr(loaded.model, "head_ids", None))


def run_text(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads or 2)
    repeats, n = args.repeats or 3, args.new_tokens
    model = LlamaForCausalLM.from_pretrained(args.run, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.run)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    full = generate_ids(model, ids, n, eos_id=None)  # EOS ignored: every candidate generates exactly n tokens
    no_eos = copy.deepcopy(model.generation_config)
    no_eos.eos_token_id, no_eos.max_new_tokens, no_eos.do_sample = None, n, False

    def hf():
        return model.generate(ids, generation_config=no_eos)

    with torch.inference_mode():
        hf_tokens = hf()[0, ids.shape[1]:].tolist()
    candidates = {"full greedy (mmexit cache)": lambda: generate_ids(model, ids, n, eos_id=None), "HF generate": hf}
    results = {}
    for layer in args.draft_layers or [8, 12, 15]:
        for k in args.draft_tokens:
            name = f"speculative E={layer} k={k}"
            results[name] = generate_ids(model, ids, n, layer, k, eos_id=None)
            candidates[name] = lambda layer=layer, k=k: generate_ids(model, ids, n, layer, k, eos_id=None)
    seconds = time_alternating(candidates, repeats=repeats, warmup=1)
    base = seconds["full greedy (mmexit cache)"]
    rows = [{"decoder": "full greedy (mmexit cache)", "exact": True, "acceptance": None, "tokens_per_round": 1.0,
             "seconds": base, "speedup": 1.0},
            {"decoder": "HF generate", "exact": hf_tokens == full.tokens, "acceptance": None, "tokens_per_round": 1.0,
             "seconds": seconds["HF generate"], "speedup": base / seconds["HF generate"]}]
    for name, generation in results.items():
        spec = generation.speculative
        rows.append({"decoder": name, "exact": generation.tokens == full.tokens, "acceptance": spec.acceptance_rate,
                     "accepted": spec.accepted, "drafted": spec.drafted, "tokens_per_round": spec.tokens_per_round,
                     "seconds": seconds[name], "speedup": base / seconds[name]})
    info = {"machine": machine_info(), "model": args.run, "layers": model.config.num_hidden_layers,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": n, "threads": torch.get_num_threads(),
            "repeats": repeats, "continuation": tokenizer.decode(full.tokens)}
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=2))
        return 0
    print(json.dumps(info))
    print_rows(rows)
    return 0
