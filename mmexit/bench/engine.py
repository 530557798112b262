"""``mmexit bench engine``: the serving engines in process (no HTTP): saturation throughput, open-loop latency.

    mmexit bench engine RUN [--texts FILE] [--rule SPEC] [--engines full,batch,continuous] [--rows 1024]
        [--repeats 3] [--max-batch 32] [--slots N] [--max-wait-ms MS] [--max-wait-calls N] [--threads N]
        [--rate 100 --duration 20] [--json]

Saturation: ``--rows`` single-text requests are queued at once and the engine runs until the last
is answered (texts/s; tokenization is done before the timer). Engines are timed alternately
(``time_alternating``: A B C A B C ..., median of ``--repeats``). Also reported per engine: texts per
CPU-second of the model thread (with ``--threads 1`` all compute runs there: a figure that other
processes on a shared machine disturb far less than wall time), the mean exit layer of the answers,
their layer speed-up L / mean layer, efficiency (speed-up over full / layer speed-up) and rows per
layer call. ``--rate``: an open-loop run per engine, Poisson arrivals of one text at ``--rate``/s for
``--duration`` s from a submitting thread, latency p50/p99 from each scheduled arrival. Over HTTP:
``mmexit bench load``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time

import torch

from mmexit.bench.inputs import read_texts
from mmexit.data.examples import TextExample
from mmexit.errors import RecipeError
from mmexit.evaluation.timing import time_alternating
from mmexit.serve.load import load
from mmexit.serve.service import Limits, build_service
from mmexit.serve.text_rows import encode_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a trained text run folder")
    parser.add_argument("--texts", help=".jsonl (a text field, e.g. the run's predictions_test.jsonl), .tsv (a text "
                                        "column) or one text per line (default: a built-in list)")
    parser.add_argument("--rule", help="rule spec (default: the run's chosen point)")
    parser.add_argument("--engines", default="full,batch,continuous", help="comma-separated engines")
    parser.add_argument("--rows", type=int, default=1024, help="texts per saturation run (the texts repeat if fewer)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--slots", type=int, help="continuous engine: rows in flight (default: its own)")
    parser.add_argument("--max-wait-ms", type=float, help="batch/full engines: wait for a fuller batch")
    parser.add_argument("--max-wait-calls", type=int,
                        help="continuous engine: age bound of a layer queue, in layer calls (default: 2 x layers)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--no-group-lengths", dest="group_lengths", action="store_false",
                        help="continuous engine: do not group rows of similar length per call")
    parser.add_argument("--rate", type=float, help="also an open-loop run at this many texts/s per engine")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the open-loop run")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of the table")


class CallStats:
    """Rows per layer call, collected from an engine's ``on_call`` hook (layers >= 1 only)."""

    def __init__(self) -> None:
        self.calls, self.rows = 0, 0

    def __call__(self, layer: int, rows: int) -> None:
        if layer > 0:
            self.calls += 1
            self.rows += rows


def saturate(engine, rows: list, num_layers: int) -> dict:
    """Queue every row as its own request at once and wait for all: the model thread's CPU seconds,
    the answers' mean exit layer and rows per layer call (wall time: ``time_alternating`` around it)."""
    stats = CallStats()
    engine.on_call = stats
    clock = time.pthread_getcpuclockid(engine.thread.ident)  # the model thread's CPU time
    cpu = time.clock_gettime(clock)
    futures = [engine.submit([row]) for row in rows]
    outputs = [future.result(timeout=600)[0] for future in futures]
    cpu = time.clock_gettime(clock) - cpu
    engine.on_call = None
    mean_layer = statistics.fmean(o.exit_layer for o in outputs)
    return {"texts_per_cpu_s": len(rows) / cpu, "mean_exit_layer": mean_layer, "layer_speedup": num_layers / mean_layer,
            "rows_per_call": stats.rows / max(1, stats.calls)}


def open_loop(engine, rows: list, rate: float, duration: float, seed: int = 0) -> dict:
    """Poisson arrivals of single rows at ``rate``/s for ``duration`` s; latency from scheduled arrival."""
    rng, latencies, lock = random.Random(seed), [], threading.Lock()
    start = time.perf_counter()
    arrival, index, futures = start, 0, []

    def done(scheduled: float):
        def callback(_future) -> None:
            with lock:
                latencies.append(time.perf_counter() - scheduled)
        return callback

    while True:
        arrival += rng.expovariate(rate)
        if arrival - start > duration:
            break
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        future = engine.submit([rows[index % len(rows)]])
        future.add_done_callback(done(arrival))
        futures.append(future)
        index += 1
    for future in futures:
        future.result(timeout=600)
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"offered": rate, "requests": len(futures), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "served_per_s": len(futures) / (time.perf_counter() - start)}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = load(args.run, rule=args.rule, device="cpu")
    if predictor.task != "text_classification":
        raise RecipeError(f"{args.run}: a {predictor.task} run; mmexit bench engine times the text engines")
    names = [name for name in args.engines.split(",") if name]
    limits = Limits(max_queue_wait=0)  # no load shedding: every queued row is measured
    scheduler = {} if args.max_wait_calls is None else {"max_wait_calls": args.max_wait_calls}
    service = build_service(predictor, names[0], args.max_batch, max_queue=max(args.rows, 100_000), limits=limits,
                            slots=args.slots, max_wait_ms=args.max_wait_ms, engines=names,
                            group_lengths=args.group_lengths, **scheduler).start()
    try:
        texts = read_texts(args.texts)
        texts = (texts * -(-args.rows // len(texts)))[:args.rows]  # a short file is repeated
        rows = encode_rows(predictor.processor, [TextExample(t, None, 0) for t in texts], predictor.max_length)
        num_layers = predictor.model.num_layers
        for name in names:  # warm-up
            saturate(service.engines[name], rows[:64], num_layers)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        candidates = {name: (lambda name=name: runs[name].append(saturate(service.engines[name], rows, num_layers)))
                      for name in names}
        seconds = time_alternating(candidates, repeats=args.repeats, warmup=0)
        results = []
        for name in names:
            median = {key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]}
            median.update(engine=name, seconds=seconds[name], texts_per_s=len(rows) / seconds[name],
                          row_layers_per_s=len(rows) * median["mean_exit_layer"] / seconds[name])
            results.append(median)
        full = next((r for r in results if r["engine"] == "full"), None)
        for median in results:
            if full:
                median["vs_full"] = median["texts_per_s"] / full["texts_per_s"]
                median["efficiency"] = median["vs_full"] / median["layer_speedup"]
                median["cpu_vs_full"] = median["texts_per_cpu_s"] / full["texts_per_cpu_s"]
            if args.rate:
                median["open_loop"] = open_loop(service.engines[median["engine"]], rows, args.rate, args.duration)
    finally:
        service.stop()
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
               f"rule {predictor.operating_point}, {len(rows)} texts, max batch {args.max_batch}, "
               f"continuous: {service.engines['continuous'].describe() if 'continuous' in names else '-'}")
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return 0
    print(f"{machine}; median of {args.repeats}, engines alternated")
    print("| engine | texts/s | vs full | texts per CPU-s (model thread) | vs full | mean exit layer | "
          "layer speed-up | efficiency | rows per layer call |" + (" open loop p50 / p99 ms |" if args.rate else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.rate else ""))
    for r in results:
        cells = [r["engine"], f"{r['texts_per_s']:.1f}", f"{r.get('vs_full', float('nan')):.2f}",
                 f"{r['texts_per_cpu_s']:.1f}", f"{r.get('cpu_vs_full', float('nan')):.2f}",
                 f"{r['mean_exit_layer']:.2f}", f"{r['layer_speedup']:.2f}", f"{r.get('efficiency', float('nan')):.2f}",
                 f"{r['rows_per_call']:.1f}"]
        if args.rate:
            cells.append(f"{r['open_loop']['p50_ms']:.0f} / {r['open_loop']['p99_ms']:.0f} @ {args.rate:g}/s")
        print("| " + " | ".join(cells) + " |")
    return 0
