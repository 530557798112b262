"""``mmexit bench load``: open-loop load test of an ``mmexit serve`` server on loopback (asyncio + aiohttp).

    mmexit bench load --url http://127.0.0.1:8000 --rate 50 --duration 20
    mmexit bench load --url http://127.0.0.1:8000 --engines full,batch,continuous --closed 64
    mmexit bench load --url http://127.0.0.1:8000 --sweep --rates 20,40,60,80 --png sweep.png --json

Open loop: requests arrive as a Poisson process at ``--rate`` per second (seeded) whatever the server
does; latency runs from each request's *scheduled* arrival to its answer, so a client that falls
behind is not hidden (no coordinated omission). ``--closed N`` instead keeps N requests in flight
back to back (saturation throughput). One text (``--texts-per-request``) per request by default,
drawn in turn from ``--texts`` (.txt one per line, .jsonl with a "text" field, .tsv with a
``text`` column) or a built-in list; ``--task caption`` posts images from ``--images DIR``.
``--engines`` runs the same test against each engine of one server (``?engine=NAME``).

Prints per run: offered and achieved rate, throughput (answers and texts per second), p50/p95/p99
latency of the 200s, answers by status (``timeout``/``conn`` for client-side failures,
``client-limit`` for arrivals dropped at ``--concurrency-limit``), the exit-layer mix, and with
``--pid`` the server's peak RSS. Bounded: a run sends at most ``--max-requests`` and stops
scheduling after ``--duration`` s; requests still open ``--timeout`` s later are abandoned.
Only loopback URLs are accepted. In process, without HTTP: ``mmexit bench engine``.

The client is aiohttp: about 0.5 ms of CPU per request. An httpx client with thousands of pooled
connections costs ~6 ms per request; on a 2-core machine shared with the server it fell behind at
200 requests/s and its own backlog read as lost requests (docs/results/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from mmexit.bench.inputs import read_images, read_texts
from mmexit.errors import RecipeError

if TYPE_CHECKING:
    import aiohttp

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def check_loopback(parser: argparse.ArgumentParser, url: str) -> None:
    """Stop with a usage error unless ``url`` is on a loopback address (the only targets allowed here)."""
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and f"[{host}]" not in LOOPBACK:
        parser.error(f"--url: only loopback addresses are allowed here, got {host!r}")
def client_library() -> ModuleType:
    """aiohttp (an optional dependency: the ``serve`` extra), or one line saying how to install it."""
    try:
        import aiohttp
    except ImportError:
        raise RecipeError("mmexit bench load needs aiohttp: pip install -e \".[serve]\"") from None
    return aiohttp


class Payloads:
    """Request bodies in turn: ``{"texts": [...]}`` JSON or multipart image files."""

    def __init__(self, task: str, texts: list[str], images: list[bytes], per_request: int) -> None:
        self.task, self.texts, self.images, self.per_request, self.next = task, texts, images, per_request, 0

    def take(self) -> dict:
        if self.task == "caption":
            blobs = [self.images[(self.next + i) % len(self.images)] for i in range(self.per_request)]
            self.next += self.per_request
            form = client_library().FormData()
            for i, blob in enumerate(blobs):
                form.add_field("images", blob, filename=f"{i}.png", content_type="image/png")
            return {"data": form}
        texts = [self.texts[(self.next + i) % len(self.texts)] for i in range(self.per_request)]
        self.next += self.per_request
        return {"json": {"texts": texts}}


class Recorder:
    """Outcomes of one run: (scheduled arrival, latency s, status) per request, exit layers of the 200s."""

    def __init__(self) -> None:
        self.records: list[tuple[float, float, str]] = []
        self.layers: Counter = Counter()
        self.rows = 0
        self.peak_rss_mb = 0.0


async def send(client: aiohttp.ClientSession, url: str, payload: dict, scheduled: float, recorder: Recorder) -> None:
    aiohttp = client_library()
    try:
        async with client.post(url, **payload) as response:
            status = str(response.status)
            if response.status == 200:
                results = (await response.json())["results"]
                recorder.rows += len(results)
                recorder.layers.update(r.get("exit_layer") for r in results if r.get("exit_layer") is not None)
            else:
                await response.read()
    except asyncio.TimeoutError:
        status = "timeout"
    except (aiohttp.ClientError, OSError):
        status = "conn"
    recorder.records.append((scheduled, time.perf_counter() - scheduled, status))


def session(connections: int, timeout: float) -> aiohttp.ClientSession:
    """A client session with at most ``connections`` open connections and ``timeout`` s per request."""
    aiohttp = client_library()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


async def watch_rss(pid: Optional[int], recorder: Recorder, stop: asyncio.Event) -> None:
    """Peak resident memory (MB) of the server process while the run lasts (Linux /proc)."""
    if not pid:
        return
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    recorder.peak_rss_mb = max(recorder.peak_rss_mb, int(line.split()[1]) / 1024)
        except OSError:
            return
        await asyncio.sleep(0.2)


async def open_loop(url: str, rate: float, duration: float, payloads: Payloads, args) -> tuple[Recorder, float]:
    """Poisson arrivals at ``rate``/s for ``duration`` s (at most ``args.max_requests``)."""
    recorder, rng = Recorder(), random.Random(args.seed)
    stop = asyncio.Event()
    async with session(args.concurrency_limit, args.timeout) as client:
        watcher = asyncio.create_task(watch_rss(args.pid, recorder, stop))
        tasks: set[asyncio.Task] = set()
        start = time.perf_counter()
        arrival, sent = start, 0
        while sent < args.max_requests:
            arrival += rng.expovariate(rate)
            if arrival - start > duration:
                break
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += 1
            if len(tasks) >= args.concurrency_limit:
                recorder.records.append((arrival, 0.0, "client-limit"))
                continue
            task = asyncio.create_task(send(client, url, payloads.take(), arrival, recorder))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=args.timeout + 5)
            for task in pending:
                task.cancel()
                recorder.records.append((0.0, 0.0, "abandoned"))
        wall = time.perf_counter() - start
        stop.set()
        await watcher
    return recorder, wall


async def closed_loop(url: str, clients: int, duration: float, payloads: Payloads, args) -> tuple[Recorder, float]:
    """``clients`` requests in flight back to back for ``duration`` s: the saturation throughput."""
    recorder, stop = Recorder(), asyncio.Event()
    budget = [args.max_requests]
    async with session(clients, args.timeout) as client:
        watcher = asyncio.create_task(watch_rss(args.pid, recorder, stop))
        start = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - start < duration and budget[0] > 0:
                budget[0] -= 1
                await send(client, url, payloads.take(), time.perf_counter(), recorder)

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        stop.set()
        await watcher
    return recorder, wall


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(recorder: Recorder, wall: float, label: str, offered: Optional[float], per_request: int) -> dict:
    ok = [latency for _, latency, status in recorder.records if status == "200"]
    statuses = Counter(status for _, _, status in recorder.records)
    total_layers = sum(recorder.layers.values())
    mix = {str(layer): round(count / total_layers, 4) for layer, count in sorted(recorder.layers.items())}
    mean_layer = sum(layer * count for layer, count in recorder.layers.items()) / total_layers if total_layers else None
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"label": label, "offered_rps": offered, "requests": len(recorder.records), "wall_s": round(wall, 2),
            "achieved_rps": round(len(recorder.records) / wall, 2) if wall else None,
            "throughput_rps": round(len(ok) / wall, 2) if wall else None,
            "texts_per_s": round(recorder.rows / wall, 2) if wall else None,
            "p50_ms": ms(percentile(ok, 50)), "p95_ms": ms(percentile(ok, 95)), "p99_ms": ms(percentile(ok, 99)),
            "mean_ms": ms(statistics.fmean(ok)) if ok else None, "status": dict(sorted(statuses.items())),
            "exit_layer_mix": mix, "mean_exit_layer": round(mean_layer, 3) if mean_layer else None,
            "texts_per_request": per_request, "peak_rss_mb": round(recorder.peak_rss_mb, 1) or None}


HEAD = ("run", "offered/s", "answers/s", "texts/s", "p50 ms", "p95 ms", "p99 ms", "status", "mean exit",
        "peak RSS MB")


def print_table(rows: list[dict], head: bool = True) -> None:
    if head:
        print("| " + " | ".join(HEAD) + " |")
        print("|" + "---|" * len(HEAD))
    for row in rows:
        cells = (row["label"], row["offered_rps"] if row["offered_rps"] is not None else "closed",
                 row["throughput_rps"], row["texts_per_s"], row["p50_ms"], row["p95_ms"], row["p99_ms"],
                 " ".join(f"{k}:{v}" for k, v in row["status"].items()), row["mean_exit_layer"], row["peak_rss_mb"])
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    sys.stdout.flush()


def plot(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine in dict.fromkeys(row["engine"] for row in rows):
        mine = [row for row in rows if row["engine"] == engine and row["offered_rps"] is not None]
        offered = [row["offered_rps"] for row in mine]
        line, = latency.plot(offered, [row["p50_ms"] for row in mine], marker="o", label=f"{engine} p50")
        latency.plot(offered, [row["p99_ms"] for row in mine], marker="x", linestyle="--", color=line.get_color(),
                     label=f"{engine} p99")
        throughput.plot(offered, [row["texts_per_s"] for row in mine], marker="o", label=engine)
    latency.set(xlabel="offered load (requests/s)", ylabel="latency of 200s (ms)", yscale="log",
                title="latency vs offered load")
    throughput.set(xlabel="offered load (requests/s)", ylabel="answered texts/s", title="throughput vs offered load")
    for axes in (latency, throughput):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)


async def wait_idle(base: str, engine: Optional[str], limit_s: float = 60.0) -> None:
    """Between runs: wait (bounded) until the server's queue is empty."""
    aiohttp = client_library()
    async with session(4, 10.0) as client:
        end = time.perf_counter() + limit_s
        while time.perf_counter() < end:
            try:
                async with client.get(f"{base}/metrics") as response:
                    metrics = await response.text()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                return
            depths = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("mmexit_queue_depth{")]
            if not any(depths):
                return
            await asyncio.sleep(0.2)


async def main_async(args) -> list[dict]:
    base = args.url.rstrip("/")
    path = "/v1/caption" if args.task == "caption" else "/v1/classify"
    texts = read_texts(args.texts) if args.task == "classify" else []
    images = read_images(args.images) if args.task == "caption" else []
    engines = [e for e in (args.engines or "").split(",") if e] or [None]
    if args.sweep:
        rates = [float(r) for r in args.rates.split(",")] if args.rates else \
            [round(args.rate * f, 2) for f in (0.25, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)]
    else:
        rates = [None] if args.closed else [args.rate]
    rows = []
    for engine in engines:
        url = base + path + (f"?engine={engine}" if engine else "")
        for rate in rates:
            payloads = Payloads(args.task, texts, images, args.texts_per_request)
            await wait_idle(base, engine)
            if args.warmup > 0:
                await closed_loop(url, 4, args.warmup, payloads, argparse.Namespace(**{**vars(args), "pid": None}))
            if rate is None:
                recorder, wall = await closed_loop(url, args.closed, args.duration, payloads, args)
                label = f"{engine or 'default'} closed x{args.closed}"
            else:
                recorder, wall = await open_loop(url, rate, args.duration, payloads, args)
                label = f"{engine or 'default'} @{rate:g}/s"
            row = summarize(recorder, wall, label, rate, args.texts_per_request) | {"engine": engine or "default"}
            rows.append(row)
            if not args.json:
                print_table([row], head=len(rows) == 1)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL (loopback only), e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate", type=float, default=20.0, help="Poisson arrivals per second (default 20)")
    parser.add_argument("--sweep", action="store_true", help="run --rates (default 0.25..2 x --rate) in turn")
    parser.add_argument("--rates", help="comma-separated offered loads for --sweep")
    parser.add_argument("--closed", type=int, default=0, help="closed loop with N requests in flight instead")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run (default 20)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds of closed-loop warm-up before each run")
    parser.add_argument("--task", choices=("classify", "caption"), default="classify")
    parser.add_argument("--texts", help=".txt / .jsonl / .tsv file of texts (default: a built-in list)")
    parser.add_argument("--images", help="folder of .png/.jpg images (--task caption)")
    parser.add_argument("--texts-per-request", type=int, default=1, help="texts (or images) per request")
    parser.add_argument("--engines", help="comma-separated engines to test in turn (?engine=NAME)")
    parser.add_argument("--concurrency-limit", type=int, default=512, help="requests in flight at most (default 512)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="requests per run at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", type=int, help="server process id: report its peak RSS")
    parser.add_argument("--png", help="write latency and throughput vs offered load here (with --sweep)")
    parser.add_argument("--json", action="store_true", help="print the runs as one JSON document")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for a non-loopback URL or a non-positive rate, duration or limit."""
    check_loopback(parser, args.url)
    if args.rate <= 0 or args.duration <= 0 or args.texts_per_request < 1 or args.concurrency_limit < 1:
        parser.error("--rate, --duration, --texts-per-request and --concurrency-limit must be positive")


def run(args: argparse.Namespace) -> int:
    client_library()
    rows = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps({"url": args.url, "task": args.task, "duration_s": args.duration, "runs": rows}, indent=2))
    if args.png:
        plot(rows, args.png)
        print(f"mmexit bench load: wrote {args.png}", file=sys.stderr)
    return 0
