#!/usr/bin/env python
"""What limits the wall-clock efficiency of per-token early exit in caption decoding.

    python tools/bench_caption.py [--model DIR] [--width 768 --layers 12 --heads 12 --vocab 50257]
                                  [--batch-sizes 16 1] [--steps 20] [--repeats 5] [--no-continuous]

Times real KV-cached greedy decoding (``mmexit.inference.search``) of a captioner: a trained
one (``--model``, e.g. a quickstart run's ``model/`` folder) or a random one of the given decoder
size built in code. The exit pattern is fixed, so the layer speed-up is known whatever the
weights, and every row decodes exactly ``--steps`` tokens (EOS ignored):
- ``never``: every exit head and the rule run, nobody exits (the overhead of asking);
- ``fixed@k``: every token stops at exit k (k = the middle exit by default), under ``propagate``,
  asking every exit head on the way (as max-prob, BEEM and PCEE must), or, like the saturation
  rule, computing logits only at the exit where rows stop;
- ``alternate@k``: tokens alternate between exit k and the last layer, under ``propagate`` and
  ``deferred`` (whose skipped layers then run in the next deep token's chunk);
- ``parity@k``: a token stops at exit k when exit k's argmax is even, else runs to the last layer:
  rows of one step at different depths, decided by each token alone (the same in every decoder).
Each pattern runs in the step-synchronous decoder (``greedy_decode``, batches of B) and, for B > 1,
in the layer-level continuous decoder (``ContinuousDecoder`` with B slots, ``propagate``; rows of
different steps share layer calls; ``alternate`` has no per-row meaning there and is left out).
Prints per batch size and decoder: layer speed-up, compute speed-up (deferred: catch-up
included), measured wall speed-up against the step-synchronous full model (no exit heads) and
efficiency = wall / layer speed-up; "full" of the continuous decoder is its own row.
Timings alternate all candidates per repeat and report medians (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.inference.continuous_decoder import continuous_greedy_decode  # noqa: E402
from mmexit.inference.search import greedy_decode  # noqa: E402
from mmexit.models.captioner import build_captioner, load_captioner  # noqa: E402
from mmexit.evaluation.speed import layer_speedup  # noqa: E402
from mmexit.evaluation.timing import machine_info, time_alternating  # noqa: E402
from mmexit.exits.base import ExitRule  # noqa: E402
from mmexit.exits.confidence import FixedExitRule, NeverExitRule  # noqa: E402


class AlternateRule(ExitRule):
    """Even tokens stop at exit ``threshold``; odd tokens run to the last layer."""

    name = "alternate"

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.tokens = 0

    def start(self, rows: int, device) -> dict:
        self.tokens += 1
        return {}

    def decide(self, view, state) -> torch.Tensor:
        stop = self.tokens % 2 == 1 and view.exit_index >= int(self.threshold)
        return torch.full((view.num_rows,), stop, dtype=torch.bool, device=view.device)


class ParityRule(ExitRule):
    """Tokens whose argmax at exit ``threshold`` is even stop there; the others run to the last layer."""

    name = "parity"

    def decide(self, view, state) -> torch.Tensor:
        if view.exit_index != int(self.threshold):
            return torch.zeros(view.num_rows, dtype=torch.bool, device=view.device)
        return view.logits.argmax(-1) % 2 == 0


class FixedNoLogitsRule(FixedExitRule):
    """fixed@k that reads no logits (like the saturation rule): exit heads run only where rows stop."""

    needs_logits = False


def random_captioner(width: int, layers: int, heads: int, vocab: int, patches_side: int = 4):
    spec = {
        "encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                    "kwargs": {"img_size": 16 * patches_side, "patch_size": 16, "embed_dim": 192, "depth": 1,
                               "num_heads": 3}},
        "decoder": {"config": {"n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": 64}},
        "vocab_size": vocab, "special_ids": {"bos": 1, "eos": 2, "pad": 0}, "exits": "all", "exit_head": "shared",
    }
    return build_captioner(spec), 16 * patches_side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a saved captioner folder (captioner.json + model.safetensors)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--exit", type=int, default=None, help="0-based exit index of fixed@k (default: middle)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-continuous", action="store_true", help="time the step-synchronous decoder only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = load_captioner(args.model)
        size = int(model.spec.get("image_size") or model.spec["encoder"]["kwargs"].get("img_size", 224))
        label = str(args.model)
    else:
        model, size = random_captioner(args.width, args.layers, args.heads, args.vocab)
        label = f"random GPT-2 decoder {args.layers}x{args.width}, vocab {args.vocab}"
    model.eval()
    k = args.exit if args.exit is not None else model.num_exits // 2 - 1
    with torch.inference_mode():
        features = model.encode(torch.randn(args.images, 3, size, size))
    print(f"# {label}; exits after layers {model.exits}; k = exit {k} (layer {model.exits[k]})")
    print(f"# {machine_info()}")
    rules = {
        "never": (NeverExitRule, "propagate"),
        f"fixed@{k}": (lambda: FixedExitRule(k), "propagate"),
        f"fixed@{k} logits only at the exit": (lambda: FixedNoLogitsRule(k), "propagate"),
        f"alternate@{k} propagate": (lambda: AlternateRule(k), "propagate"),
        f"alternate@{k} deferred": (lambda: AlternateRule(k), "deferred"),
        f"parity@{k}": (lambda: ParityRule(k), "propagate"),
    }
    continuous_rules = {name: make for name, (make, policy) in rules.items()
                        if policy == "propagate" and not name.startswith("alternate")}
    print("| batch | decoder | rule | layer x | compute x | wall x | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        count = args.images if batch > 1 else max(4, args.images // 4)

        def decode(make_rule=None, policy="propagate"):
            results = [greedy_decode(model, features[s:s + batch], make_rule() if make_rule else None, args.steps,
                                     1, -1, policy) for s in range(0, count, batch)]
            layers = torch.cat([r.layers for r in results])
            return layers, sum(r.catchup_layers for r in results)

        def continuous(make_rule=None):  # EOS -1: every row decodes --steps tokens, as above
            result = continuous_greedy_decode(model, features[:count], make_rule() if make_rule else None, args.steps,
                                              1, -1, slots=batch)
            return result.layers, 0

        candidates = {("step-sync", "full"): decode}
        candidates.update({("step-sync", name): (lambda m=m, p=p: decode(m, p)) for name, (m, p) in rules.items()})
        if batch > 1 and not args.no_continuous:
            candidates[("continuous", "full")] = continuous
            candidates.update({("continuous", name): (lambda m=m: continuous(m)) for name, m in continuous_rules.items()})
        times = time_alternating(candidates, args.repeats, warmup=1)
        for (decoder, name), run in candidates.items():
            if (decoder, name) == ("step-sync", "full"):
                continue
            layers, catchup = run()
            layer_x = layer_speedup(layers, model.num_layers)
            compute_x = model.num_layers * layers.numel() / float(layers.sum() + catchup)
            wall = times[("step-sync", "full")] / times[(decoder, name)]
            print(f"| {batch} | {decoder} | {name} | {layer_x:.2f} | {compute_x:.2f} | {wall:.2f} | {wall / layer_x:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
