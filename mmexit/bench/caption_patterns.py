"""``mmexit bench caption --patterns``: what limits the wall-clock efficiency of per-token early exit.

    mmexit bench caption RUN|random --patterns [--exit K] [--steps 20] [--batch-sizes 16 1] [--images 32]
        [--repeats 5] [--threads N] [--decoders step-sync continuous] [--width 192 --layers 6 ...]

Times real KV-cached greedy decoding of a captioner (a trained run's, a saved captioner folder's, or
a random one of the given decoder size) on random images. The exit pattern is fixed, so the layer
speed-up is known whatever the weights, and every row decodes exactly ``--steps`` tokens (EOS ignored):
- ``never``: every exit head and the rule run, nobody exits (the overhead of asking);
- ``fixed@k``: every token stops at exit k (k = the middle exit by default), under ``propagate``,
  asking every exit head on the way (as max-prob, BEEM and PCEE must), or, like the saturation
  rule, computing logits only at the exit where rows stop;
- ``alternate@k``: tokens alternate between exit k and the last layer, under ``propagate`` and
  ``deferred`` (whose skipped layers then run in the next deep token's chunk);
- ``parity@k``: a token stops at exit k when exit k's argmax is even, else runs to the last layer.
Each pattern runs in the step-synchronous decoder (batches of B) and, for B > 1, in the continuous
decoder (``propagate``; ``alternate`` has no per-row meaning there and is left out) with B slots, or
``--pool P`` slots and calls of at most B (a pool deeper than a call: the same largest call as the
step-synchronous batches). Prints per batch size and decoder: layer speed-up, compute speed-up
(deferred: catch-up included), wall speed-up against the step-synchronous full model, efficiency =
wall / layer speed-up, and for the continuous decoder the same two against the continuous full model.
"""

from __future__ import annotations

import argparse

import torch

from mmexit.bench.captioners import RANDOM, random_from_args, saved_captioner
from mmexit.errors import RecipeError
from mmexit.evaluation.speed import layer_speedup
from mmexit.evaluation.timing import machine_info, time_alternating
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import FixedExitRule, NeverExitRule
from mmexit.inference.continuous_decoder import continuous_greedy_decode
from mmexit.inference.scheduler import SchedulerSettings
from mmexit.inference.search import greedy_decode


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


def add_arguments(group) -> None:
    group.add_argument("--patterns", action="store_true", help="time fixed exit patterns instead of a rule")
    group.add_argument("--exit", type=int, help="0-based exit index k of the patterns (default: the middle exit)")
    group.add_argument("--steps", type=int, default=20, help="tokens every row decodes (EOS ignored)")
    group.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1],
                       help="rows per batch (step-sync) = the largest layer call (continuous)")
    group.add_argument("--pool", type=int, help="continuous decoder slots (default: the batch size; more: a pool "
                                                "deeper than a call)")


def run(args: argparse.Namespace) -> int:
    if args.pool is not None and args.pool < 1:
        raise RecipeError(f"--pool must be >= 1, got {args.pool}")
    if args.threads:
        torch.set_num_threads(args.threads)
    images, repeats = args.images or 32, args.repeats or 5
    if args.run == RANDOM:
        model, size, label = random_from_args(args)
    else:
        model, label = saved_captioner(args.run), args.run
        size = int(model.spec.get("image_size") or model.spec["encoder"]["kwargs"].get("img_size", 224))
    torch.manual_seed(0)
    k = args.exit if args.exit is not None else model.num_exits // 2 - 1
    with torch.inference_mode():
        features = model.encode(torch.randn(images, 3, size, size))
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
    print("| batch | decoder | rule | layer x | compute x | wall x | efficiency | x cont. full | efficiency (cont.) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        count = images if batch > 1 else max(4, images // 4)

        def decode(make_rule=None, policy="propagate"):
            results = [greedy_decode(model, features[s:s + batch], make_rule() if make_rule else None, args.steps,
                                     1, -1, policy) for s in range(0, count, batch)]
            return torch.cat([r.layers for r in results]), sum(r.catchup_layers for r in results)

        def continuous(make_rule=None):  # EOS -1: every row decodes --steps tokens, as above
            result = continuous_greedy_decode(model, features[:count], make_rule() if make_rule else None, args.steps,
                                              1, -1, slots=max(batch, args.pool or batch),
                                              scheduler=SchedulerSettings(max_call=batch))
            return result.layers, 0

        candidates = {("step-sync", "full"): decode}
        if "step-sync" in args.decoders:
            candidates.update({("step-sync", name): (lambda m=m, p=p: decode(m, p)) for name, (m, p) in rules.items()})
        if batch > 1 and "continuous" in args.decoders:
            candidates[("continuous", "full")] = continuous
            candidates.update({("continuous", name): (lambda m=m: continuous(m)) for name, m in continuous_rules.items()})
        times = time_alternating(candidates, repeats, warmup=1)
        for (decoder, name), candidate in candidates.items():
            if (decoder, name) == ("step-sync", "full"):
                continue
            layers, catchup = candidate()
            layer_x = layer_speedup(layers, model.num_layers)
            compute_x = model.num_layers * layers.numel() / float(layers.sum() + catchup)
            wall = times[("step-sync", "full")] / times[(decoder, name)]
            against = ""
            if decoder == "continuous":
                continuous_x = times[("continuous", "full")] / times[(decoder, name)]
                against = f" {continuous_x:.2f} | {continuous_x / layer_x:.2f} |"
            print(f"| {batch} | {decoder} | {name} | {layer_x:.2f} | {compute_x:.2f} | {wall:.2f} | {wall / layer_x:.2f} |"
                  + (against or " | |"))
    return 0
