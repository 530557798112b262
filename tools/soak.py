"""Soak test of an ``mmexit serve`` server on loopback: steady open-loop load with malformed requests mixed in.

    python tools/soak.py --url http://127.0.0.1:8000 --rate 40 --duration 600 --malformed 0.05 \
        --texts texts.txt --png docs/results/soak.png --json soak.json

Poisson arrivals at ``--rate``/s for ``--duration`` s (seeded, bounded: at most rate x duration x 1.5
requests, then it stops by itself). A share ``--malformed`` of the requests is bad on purpose, in
turn: invalid JSON, an empty list, a wrong type, an over-long text (413), an unknown engine. A good
request must get 200, a bad one 400/413; anything else (5xx, timeout, reset, a 200 for a bad one) is
a failure. Every ``--window`` s it records p50/p95/p99 of the good requests' latency (from their
scheduled arrival, as in ``mmexit bench load``) and the resident memory of the server process and of
its engine worker (``engine_pid`` in /health, for ``--engine-process``). Prints one JSON summary;
``--png`` plots latency percentiles and memory over time. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import aiohttp

from mmexit.bench.inputs import read_texts
from mmexit.bench.load import check_loopback, percentile, session

MALFORMED = (  # (what, request keyword arguments, expected statuses)
    ("invalid JSON", {"data": b'{"texts": ["a film"', "headers": {"content-type": "application/json"}}, {"400"}),
    ("empty list", {"json": {"texts": []}}, {"400"}),
    ("wrong type", {"json": {"texts": "a film"}}, {"400"}),
    ("over-long text", {"json": {"texts": ["film " * 5000]}}, {"413"}),
    ("unknown engine", {"json": {"texts": ["a film"]}, "params": {"engine": "fastest"}}, {"400"}),
)


def rss_mb(pid: Optional[int]) -> Optional[float]:
    """Resident memory of ``pid`` in MB (Linux /proc), None when it is gone."""
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def send(client: aiohttp.ClientSession, url: str, request: dict, expected: set[str], scheduled: float,
               records: list) -> None:
    try:
        async with client.post(url, **request) as response:
            await response.read()
            status = str(response.status)
    except asyncio.TimeoutError:
        status = "timeout"
    except (aiohttp.ClientError, OSError):
        status = "conn"
    records.append((scheduled, time.perf_counter() - scheduled, status, status in expected, "200" in expected))


def window_row(start: float, records: list, pids: dict) -> dict:
    good = [latency for _, latency, status, _, wanted_200 in records if wanted_200 and status == "200"]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"t_s": round(start, 1), "requests": len(records), "malformed": sum(1 for r in records if not r[4]),
            "failures": sum(1 for r in records if not r[3]), "status": dict(Counter(r[2] for r in records)),
            "p50_ms": ms(percentile(good, 50)), "p95_ms": ms(percentile(good, 95)), "p99_ms": ms(percentile(good, 99)),
            **{f"rss_{name}_mb": None if rss_mb(pid) is None else round(rss_mb(pid), 1) for name, pid in pids.items()}}


async def soak(args) -> dict:
    base = args.url.rstrip("/")
    texts = read_texts(args.texts)
    rng = random.Random(args.seed)
    records: list = []
    windows: list[dict] = []
    async with session(args.concurrency_limit, args.timeout) as client:
        async with client.get(f"{base}/health") as response:
            health = await response.json()
        pids = {"server": args.pid or health.get("pid"), "worker": health.get("engine_pid")}
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        arrival, sent, next_window, cut = start, 0, start + args.window, 0
        limit = int(args.rate * args.duration * 1.5) + 10
        while sent < limit:
            arrival += rng.expovariate(args.rate)
            if arrival - start > args.duration:
                break
            while time.perf_counter() >= next_window:  # close a window: the requests answered in it
                windows.append(window_row(next_window - args.window - start, records[cut:], pids))
                cut = len(records)
                next_window += args.window
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += 1
            if len(tasks) >= args.concurrency_limit:
                records.append((arrival, 0.0, "client-limit", False, True))
                continue
            if rng.random() < args.malformed:
                _, request, expected = MALFORMED[sent % len(MALFORMED)]
            else:
                request, expected = {"json": {"texts": [texts[sent % len(texts)]]}}, {"200"}
            task = asyncio.create_task(send(client, f"{base}/v1/classify", request, expected, arrival, records))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=args.timeout + 5)
            for task in pending:
                task.cancel()
                records.append((0.0, 0.0, "abandoned", False, True))
        windows.append(window_row(next_window - args.window - start, records[cut:], pids))
        wall = time.perf_counter() - start
    good = [r for r in records if r[4]]
    ok = [r[1] for r in good if r[2] == "200"]
    rss = {name: [w[f"rss_{name}_mb"] for w in windows if w.get(f"rss_{name}_mb") is not None] for name in pids}
    return {"url": args.url, "rate": args.rate, "duration_s": args.duration, "wall_s": round(wall, 1),
            "malformed_share": args.malformed, "requests": len(records), "malformed": len(records) - len(good),
            "failures": sum(1 for r in records if not r[3]), "status": dict(Counter(r[2] for r in records)),
            "answers_per_s": round(len(records) / wall, 2),
            "p50_ms": round(percentile(ok, 50) * 1000, 1) if ok else None,
            "p99_ms": round(percentile(ok, 99) * 1000, 1) if ok else None,
            "rss_mb": {name: {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
                       for name, values in rss.items() if values},
            "windows": windows}


def plot(summary: dict, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = summary["windows"]
    minutes = [w["t_s"] / 60 for w in windows]
    figure, (latency, memory) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
        latency.plot(minutes, [w[key] for w in windows], style, marker=".", label=key.split("_")[0])
    latency.set(ylabel="latency of 200s (ms)", yscale="log", title=title)
    for name in ("server", "worker"):
        values = [w.get(f"rss_{name}_mb") for w in windows]
        if any(v is not None for v in values):
            memory.plot(minutes, values, marker=".", label=f"{name} process RSS")
    memory.set(xlabel="minutes", ylabel="resident memory (MB)")
    memory.set_ylim(bottom=0)
    for axes in (latency, memory):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Soak an mmexit server on loopback.")
    parser.add_argument("--url", required=True, help="server base URL (loopback only)")
    parser.add_argument("--rate", type=float, required=True, help="Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals (default 600)")
    parser.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests (default 0.05)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per reported window (default 10)")
    parser.add_argument("--texts", help=".txt / .jsonl / .tsv file of texts (default: a built-in list)")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    parser.add_argument("--concurrency-limit", type=int, default=512, help="requests in flight at most")
    parser.add_argument("--pid", type=int, help="server process id (default: the pid /health reports)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", help="write latency percentiles and memory over time here")
    parser.add_argument("--title", default="soak", help="the PNG's title")
    parser.add_argument("--json", help="write the summary with its windows here")
    args = parser.parse_args(argv)
    check_loopback(parser, args.url)
    if args.rate <= 0 or args.duration <= 0 or args.window <= 0 or not 0 <= args.malformed < 1:
        parser.error("--rate, --duration and --window must be positive and --malformed in [0, 1)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(soak(args))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.png:
        plot(summary, args.png, args.title)
    print(json.dumps({k: v for k, v in summary.items() if k != "windows"}, indent=2))
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
