"""``mmexit serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--rule R] [--engine continuous|batch|full] ...``.

Loads the run (``mmexit.load``), builds its engine and serves the FastAPI app (``mmexit.serve.app``)
with uvicorn. ``--port 0`` picks a free port; the address is printed on stderr once listening
(``mmexit: serving RUN on http://HOST:PORT ...``). SIGTERM or Ctrl-C: stop accepting, answer
every request in flight, drain the engine, exit 0. A bad run folder, rule or address: one line
``mmexit: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from typing import Optional

from mmexit.errors import MMExitError
from mmexit.serve.engine_process import engine_hosts, process_engines
from mmexit.serve.load import load
from mmexit.serve.service import ENGINES, Limits, build_service


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmexit serve", description="Serve a trained mmexit run over HTTP.")
    parser.add_argument("run_dir", help="a trained run's output folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    parser.add_argument("--rule", help="operating point, e.g. maxprob@0.9 or full (default: the run's)")
    parser.add_argument("--engine", choices=ENGINES, default="continuous",
                        help="text runs, the default engine: continuous (layer-level batching), batch (shrinking "
                             "batch) or full (the full model); default continuous. Caption runs answer with the "
                             "request batcher; continuous also offers the continuous decoder (?engine=continuous)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="text runs: engines a request may pick with ?engine=NAME (comma-separated; default "
                             "all three, so one server compares them)")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per model call (default 32)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="rows accepted and not answered before 503 (default 1024)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504 (default 30)")
    parser.add_argument("--max-queue-wait", type=float,
                        help="503 past this many seconds of queued work, from the measured capacity "
                             "(default: half of --timeout; 0: rows only)")
    parser.add_argument("--slots", type=int, help="continuous engine: rows in flight (default 8 x --max-batch)")
    parser.add_argument("--max-wait-ms", type=float,
                        help="batch/full/caption: wait for a fuller batch (default 5)")
    parser.add_argument("--max-wait-calls", type=int,
                        help="continuous engines (text and caption): age bound of a layer queue, in layer calls "
                             "(default: twice the model's layers)")
    parser.add_argument("--no-group-lengths", dest="group_lengths", action="store_false",
                        help="continuous: take a queue's oldest rows, never group rows of similar length")
    parser.add_argument("--max-connections", type=int, default=1024,
                        help="connections and requests the HTTP layer holds at once; past it a new one gets 503 "
                             "before its body is read (uvicorn's limit_concurrency; default 1024)")
    parser.add_argument("--max-texts", type=int, default=256, help="texts per request (default 256)")
    parser.add_argument("--max-chars", type=int, default=20_000, help="characters per text (default 20000)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (GPU) or int8 (CPU) (default: the run's "
                                        "evaluate.dtype, the precision its rules were calibrated at)")
    parser.add_argument("--engine-process", action="store_true",
                        help="run the model in a worker process of its own, so the HTTP process keeps accepting and "
                             "refusing (503) requests under overload; the worker loads the run a second time")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="--engine-process: a dead worker is replaced (its requests get 503) up to this many "
                             "times a minute; past it the server exits 1 (default 5; 0: exit at the first death)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    args = parser.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_connections", "max_texts", "max_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = [name for name in args.engines if name not in ENGINES]
    if unknown:
        parser.error(f"--engines: unknown {unknown[0]!r}; allowed: {', '.join(ENGINES)}")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be >= 0")
    if args.max_wait_calls is not None and args.max_wait_calls < 0:
        parser.error("--max-wait-calls must be >= 0")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (IPv6 when ``host`` has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise MMExitError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def move_engines_to_a_process(service, args: argparse.Namespace, limits: Limits) -> None:
    """Replace ``service``'s engines by stand-ins of the same engines in a worker process
    (``mmexit.serve.engine_process``). The stand-ins keep the queue bounds; the worker's engines get
    no bound of their own (rows reach them only through the stand-ins). This process parses, tokenizes
    and decodes images only: it drops any copy of the weights it holds once the worker is ready
    (``mmexit serve`` loads it without them in the first place)."""
    from dataclasses import replace

    build = dict(engine=args.engine, max_batch=args.max_batch, max_queue=10**9,
                 limits=replace(limits, max_queue_wait=0), slots=args.slots, max_wait_ms=args.max_wait_ms,
                 engines=args.engines, group_lengths=args.group_lengths, max_wait_calls=args.max_wait_calls)
    kinds = {name: engine.kind for name, engine in service.engines.items()}
    service.engines = process_engines(str(service.predictor.run_dir), args.rule, args.device, args.threads, build,
                                      kinds, args.max_batch, args.max_queue, limits.queue_wait, args.max_restarts)
    service.predictor.release_weights()


def serve_main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        # with --engine-process the worker loads the weights; this process needs the structure only
        predictor = load(args.run_dir, rule=args.rule, device=args.device, weights=not args.engine_process,
                         dtype=args.dtype)
        if args.engine_process and args.dtype and args.dtype != predictor.recipe["evaluate"]["dtype"]:
            # the worker loads the run at its evaluate.dtype; passing another one to it is not plumbed yet
            raise MMExitError(f"--dtype: with --engine-process the worker runs at the run's evaluate.dtype "
                              f"({predictor.recipe['evaluate']['dtype']}); drop --dtype or --engine-process")
        limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, timeout=args.timeout,
                        max_queue_wait=args.max_queue_wait)
        service = build_service(predictor, args.engine, args.max_batch, args.max_queue, limits, args.slots,
                                args.max_wait_ms, args.engines, args.group_lengths, args.max_wait_calls)
        if args.engine_process:
            move_engines_to_a_process(service, args, limits)
        sock = listen(args.host, args.port)
    except (MMExitError, ValueError) as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    import uvicorn

    from mmexit.serve.app import create_app  # fastapi: the serve extra

    app = create_app(service)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(args.timeout) + 10, timeout_keep_alive=30,
                            limit_concurrency=args.max_connections)
    server = uvicorn.Server(config)
    hosts = engine_hosts(service.engines.values())
    for supervised in hosts:  # a worker that keeps dying: stop serving, exit 1, let the supervisor above take over
        supervised.on_give_up = lambda: setattr(server, "should_exit", True)
    host, port = sock.getsockname()[:2]
    health = service.health()
    engines = "/".join(f"[{name}]" if name == service.default else name for name in service.engines)
    print(f"mmexit: serving {predictor.run_dir} ({predictor.task}, {health['operating_point']}, engines {engines}) "
          f"on http://{host if ':' not in host else f'[{host}]'}:{port}", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully: these handlers
    # take it, so a drained server exits 0 instead of dying of its own SIGTERM
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        print("mmexit: error: the server did not start (see the log above)", file=sys.stderr)
        return 1
    if any(host.gave_up for host in hosts):
        print(f"mmexit: error: the engine process died more than {args.max_restarts} times in a minute; "
              "stopped serving", file=sys.stderr, flush=True)
        return 1
    print("mmexit: server stopped (requests in flight answered)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
