#!/usr/bin/env python
"""Exact self-speculative decoding (LayerSkip-style) against full greedy decoding, wall-clock.

    python tools/bench_speculative.py [--model data/cache/smollm2-135m] [--prompt "..."]
                                      [--new-tokens 48] [--draft-layers 8 12 15] [--draft-tokens 2 3 4]
                                      [--repeats 3] [--threads 2]

Plain text generation, batch 1, with a LLaMA-family causal LM from a local HF folder (default: the
packaged SmolLM2-135M, ``pypi:smollm2-135m``): full greedy decoding through mmexit's KV cache,
transformers' ``generate(do_sample=False)`` for reference, and self-speculative decoding for every
(draft layer E, draft length k): layers 1..E + the final norm and LM head draft k tokens, the full
model verifies them in one pass. Prints, per row: whether the tokens equal full greedy's, the
acceptance rate (accepted / drafted), tokens committed per round, the median seconds and the
speed-up against mmexit's full greedy (timings alternate candidates per repeat, medians).
Every candidate generates exactly ``--new-tokens`` tokens (EOS ignored). On a machine shared with
other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``: 2 spinning threads otherwise lose ~10x.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.evaluation.timing import machine_info, time_alternating  # noqa: E402
from mmexit.inference.text_generation import generate_ids  # noqa: E402

PROMPT = "The history of the printing press begins in"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/cache/smollm2-135m")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--draft-layers", type=int, nargs="+", default=[8, 12, 15])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    n = args.new_tokens
    # EOS ignored: every candidate generates exactly n tokens, so times compare like for like
    full = generate_ids(model, ids, n, eos_id=None)

    no_eos = copy.deepcopy(model.generation_config)
    no_eos.eos_token_id, no_eos.max_new_tokens, no_eos.do_sample = None, n, False

    def hf():
        return model.generate(ids, generation_config=no_eos)

    with torch.inference_mode():
        hf_tokens = hf()[0, ids.shape[1]:].tolist()
    candidates = {"full greedy (mmexit cache)": lambda: generate_ids(model, ids, n, eos_id=None),
                  "HF generate": hf}
    results = {}
    for layer in args.draft_layers:
        for k in args.draft_tokens:
            name = f"speculative E={layer} k={k}"
            results[name] = generate_ids(model, ids, n, layer, k, eos_id=None)
            candidates[name] = lambda layer=layer, k=k: generate_ids(model, ids, n, layer, k, eos_id=None)
    seconds = time_alternating(candidates, repeats=args.repeats, warmup=1)
    base = seconds["full greedy (mmexit cache)"]
    print(json.dumps(machine_info()))
    print(f"model {args.model}: {model.config.num_hidden_layers} layers, prompt {ids.shape[1]} tokens, "
          f"{n} new tokens, batch 1, {args.threads} threads, median of {args.repeats}")
    print(f"continuation: {tokenizer.decode(full.tokens)!r}")
    print("| decoder | tokens = full greedy | acceptance | tokens / round | seconds | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| full greedy (mmexit cache) | yes | - | 1 | {base:.3f} | 1.00 |")
    print(f"| HF generate | {'yes' if hf_tokens == full.tokens else 'NO'} | - | 1 | {seconds['HF generate']:.3f} "
          f"| {base / seconds['HF generate']:.2f} |")
    for name, generation in results.items():
        spec = generation.speculative
        same = "yes" if generation.tokens == full.tokens else "NO"
        print(f"| {name} | {same} | {spec.acceptance_rate:.2f} ({spec.accepted}/{spec.drafted}) | "
              f"{spec.tokens_per_round:.2f} | {seconds[name]:.3f} | {base / seconds[name]:.2f} |")


if __name__ == "__main__":
    main()
