"""Load generator for ``jkv serve``: tokens/s, time to first token and inter-token latency percentiles at several
concurrencies, through the HTTP server and through the same engine driven in-process (the server's overhead).

    python bench/load_server.py --shape llama3-8b --concurrency 1 4 16 64          # random 8B-shaped bf16 weights
    python bench/load_server.py --gguf path/to/model.gguf --concurrency 1 16 64
    python bench/load_server.py --url http://127.0.0.1:8000 --concurrency 1 64     # a server already running
    python bench/load_server.py --paced 3 4.5 --concurrency 16 64                  # no model: the server's overhead
    python bench/load_server.py --smoke                                              # tiny model, CPU, seconds
    python bench/load_server.py --shape llama3-8b --concurrency 16 --trace-ttft     # where first tokens wait

Every level sends the same request set (``--requests`` per level, default four per client, of ``--prompt-len``
random token ids and exactly ``--max-tokens`` new tokens: no stop token) from ``concurrency`` closed-loop clients:
in-process, ``concurrency`` requests are kept submitted to the engine; over HTTP, ``concurrency`` asyncio clients
(httpx, spread over ``--client-processes`` processes of their own) stream completions. One engine of
``max(concurrency)`` slots serves both, compiled before anything is timed. Random weights make random text; ids are
rendered as text by a stand-in tokenizer, so no tokenizer file is needed. One process of 64 httpx clients saturates
its interpreter at the event rate of a GPU-served level (docs/BENCHMARKS.md): the clients are spread over several
processes, as real clients are.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import queue
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench import ttft_trace
from bench.ttft_trace import prompt_key


class IdTokenizer:
    """The server's view of a tokenizer, for random weights: token ``i`` reads as `` i``; no stop token."""

    chat_template = None
    stop_ids = ()

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [int(t) % self.vocab_size for t in text.split()]

    def decode(self, ids, skip_special: bool = False) -> str:
        return "".join(f" {int(i)}" for i in ids)


@dataclasses.dataclass
class Level:
    """One mode at one concurrency: tokens over wall time, TTFT per request, every inter-token gap."""

    mode: str
    concurrency: int
    requests: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list = dataclasses.field(default_factory=list)
    itl_s: list = dataclasses.field(default_factory=list)
    log: list = dataclasses.field(default_factory=list)  # server mode: (sent, arrivals, prompt key) per request

    def add(self, submitted: float, arrivals: list[float]) -> None:
        self.requests += 1
        self.tokens += len(arrivals)
        if arrivals:
            self.ttft_s.append(arrivals[0] - submitted)
            self.itl_s.extend(np.diff(arrivals).tolist())

    def row(self) -> dict:
        def ms(xs, q):
            return round(1e3 * float(np.percentile(xs, q)), 3) if len(xs) else float("nan")

        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.wall_s, 2) if self.wall_s else float("nan"),
            **{f"ttft_p{q}_ms": ms(self.ttft_s, q) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": ms(self.itl_s, q) for q in (50, 90, 99)},
        }


def run_engine(engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Level:
    """The request set through the engine in-process, ``concurrency`` requests submitted at any time."""
    from jkv.serving import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens)
    level, todo = Level("engine", concurrency), list(prompts)
    submitted, arrivals = {}, {}

    def on_token(rid, token):
        arrivals[rid].append(time.perf_counter())

    def submit():
        rid = engine.submit(todo.pop(0), params, on_token)
        submitted[rid], arrivals[rid] = time.perf_counter(), []

    start = time.perf_counter()
    for _ in range(min(concurrency, len(todo))):
        submit()
    while engine.has_work():
        engine.step()
        for done in engine.pop_finished():
            level.add(submitted.pop(done.id), arrivals.pop(done.id))
            if todo:
                submit()
    level.wall_s = time.perf_counter() - start
    return level


async def run_clients(url: str, prompts: list[list[int]], max_tokens: int, clients: int, barrier=None) -> dict:
    """``clients`` streaming clients, each sending its next request of ``prompts`` when its last ends; a token's
    arrival is its server-sent event's. Returns the start and end (``time.perf_counter``, one clock for every
    process of the machine) and each request's ``(submitted, arrivals)``. ``barrier``: waited on before the
    start, so that every client process starts together."""
    import httpx

    todo, done = list(prompts), []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(http):
        while todo:
            body = {"prompt": todo.pop(0), "max_tokens": max_tokens, "temperature": 0, "stream": True}
            submitted, arrivals = time.perf_counter(), []
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()!r}")
                async for line in response.aiter_lines():
                    # One event per token (a multi-byte character split over tokens comes in one event).
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        arrivals.append(time.perf_counter())
            done.append((submitted, arrivals, prompt_key(body["prompt"])))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        if barrier is not None:
            barrier.wait()
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return {"start": start, "end": time.perf_counter(), "requests": done}


def _client_process(url, prompts, max_tokens, clients, barrier, results) -> None:
    try:
        results.put(asyncio.run(run_clients(url, prompts, max_tokens, clients, barrier)))
    except BaseException as e:
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")


def drive(url: str, prompts, max_tokens: int, concurrency: int, processes: int = 4) -> Level:
    """``concurrency`` closed-loop streaming clients over ``min(processes, concurrency)`` processes of their own,
    as real clients are: the clients' Python work (HTTP, SSE lines, JSON) neither competes with the server's for
    its interpreter lock nor makes one client process the bottleneck (one asyncio process of httpx clients
    saturates near 64 streams). Client ``i`` sends requests ``i, i + concurrency, ...`` of ``prompts``."""
    import multiprocessing

    processes = max(1, min(processes, concurrency))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    groups = [list(range(concurrency))[p::processes] for p in range(processes)]
    procs = [
        ctx.Process(
            target=_client_process,
            args=(
                url,
                [prompts[j] for i in g for j in range(i, len(prompts), concurrency)],
                max_tokens,
                len(g),
                barrier,
                results,
            ),
            daemon=True,
        )
        for g in groups
    ]
    for proc in procs:
        proc.start()
    parts = []
    while len(parts) < len(procs):
        try:
            parts.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs) and results.empty():
                raise RuntimeError(f"a client process died: exit codes {[p.exitcode for p in procs]}") from None
    for proc in procs:
        proc.join()
    failures = [r for r in parts if isinstance(r, str)]
    if failures:
        raise RuntimeError(f"a client process failed: {failures[0]}")
    level = Level("server", concurrency)
    for part in parts:
        for submitted, arrivals, key in part["requests"]:
            level.add(submitted, arrivals)
            level.log.append((submitted, arrivals, key))
    level.wall_s = max(r["end"] for r in parts) - min(r["start"] for r in parts)
    return level


def start_server(engine, tokenizer):
    """The app on 127.0.0.1 on a free port, in a thread: ``(url, stop)``."""
    from jkv.server import ServerOptions, create_app, make_server

    app = create_app(engine, tokenizer, ServerOptions(model_name="bench", max_waiting=1024))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, drain_s=5, log_level="warning", configure_logging=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{port}", stop


def build_engine(args, slots: int):
    if args.paced:
        from bench.paced_engine import PacedEngine

        hold_ms, wait_ms = args.paced
        return PacedEngine(slots, hold_s=hold_ms / 1e3, wait_s=wait_ms / 1e3)
    import jax
    import jax.numpy as jnp

    from jkv.caches.registry import whole_pages
    from jkv.models import llama
    from jkv.serving import Engine

    if args.gguf:
        from jkv.loading import load

        model = load(args.gguf, args.dtype, progress=False)
        config, params = model.config, model.params
    elif args.shape == "tiny":
        config = llama.LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
        )
        params = llama.init_params(config, jax.random.key(0), jnp.float32, scale=0.2)
    else:
        config = shape_config(args.shape)
        dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32, None: jnp.bfloat16}[args.dtype]
        params = llama.init_params(config, jax.random.key(0), dtype)
    max_len = args.max_len or whole_pages(args.prompt_len + args.max_tokens + 16)
    # --smoke: one step shape (a whole level's prompts fit it), so the warm-up compiles one step, not one per bucket
    buckets = (32,) if args.smoke else None
    return Engine(
        params, config, num_slots=slots, max_len=max_len, cache=args.cache, impl=args.impl, buckets=buckets,
        verbose=False,
    )  # fmt: skip


def shape_config(shape: str):
    """The preset config of a --shape name (`llama3-8b` -> `LlamaConfig.llama3_8b()`)."""
    from jkv.models import llama

    return getattr(llama.LlamaConfig, shape.replace("-", "_").replace(".", "_"))()


def compare(rows: list[dict]) -> list[str]:
    """The table: per concurrency, each mode's figures and the server's tokens/s over the engine's."""
    lines = [
        f"{'conc':>4} {'mode':>6} {'tok/s':>9} {'ttft p50':>9} {'p90':>8} {'p99':>8} {'itl p50':>8} {'p90':>7} "
        f"{'p99':>7}  (ms)"
    ]
    engine = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["mode"] == "engine"}
    for r in rows:
        ratio = ""
        if r["mode"] == "server" and r["concurrency"] in engine:
            ratio = f"  server/engine {r['tokens_per_s'] / engine[r['concurrency']]:.1%}"
        lines.append(
            f"{r['concurrency']:>4} {r['mode']:>6} {r['tokens_per_s']:>9.1f} {r['ttft_p50_ms']:>9.2f} "
            f"{r['ttft_p90_ms']:>8.2f} {r['ttft_p99_ms']:>8.2f} {r['itl_p50_ms']:>8.2f} {r['itl_p90_ms']:>7.2f} "
            f"{r['itl_p99_ms']:>7.2f}{ratio}"
        )
    return lines


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "smollm2-135m", "llama3-8b", "qwen2-0.5b"], default="llama3-8b")
    ap.add_argument("--gguf", help="real weights from this GGUF file instead of random ones of --shape")
    ap.add_argument("--url", help="drive this running server only (no in-process engine)")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None)
    ap.add_argument("--impl", choices=["pallas", "xla"], default=None)
    ap.add_argument("--cache", default="paged", help="the engine's cache kind (default: paged, as `jkv serve`)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 per client)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument(
        "--client-processes", type=int, default=4, help="processes the HTTP clients are spread over (default: 4)"
    )
    ap.add_argument(
        "--paced",
        type=float,
        nargs=2,
        metavar=("HOLD_MS", "WAIT_MS"),
        help="no model: a stand-in engine whose steps hold the interpreter HOLD_MS, then wait WAIT_MS "
        "(bench/paced_engine.py), to measure the server's own overhead on any machine",
    )
    ap.add_argument(
        "--trace-ttft",
        action="store_true",
        help="time each served request's first token in three stretches: to the engine, in it, back (ttft_trace.py)",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on any device, a few small levels")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument(
        "--default-xla-flags", action="store_true", help="leave XLA_FLAGS as given (default: what `jkv serve` adds)"
    )
    args = ap.parse_args(argv)
    if not args.default_xla_flags:
        from jkv import xla_flags

        xla_flags.apply_recommended(warn=False)  # before JAX starts, as `jkv serve` does
    if args.smoke:
        args.shape, args.concurrency, args.prompt_len, args.max_tokens = "tiny", [1, 4], 6, 6
        args.requests = args.requests or 8
    rng = np.random.default_rng(0)

    def request_set(c, vocab):
        return [rng.integers(0, vocab, size=args.prompt_len).tolist() for _ in range(args.requests or 4 * c)]

    rows = []
    if args.url:
        for c in args.concurrency:
            rows.append(drive(args.url, request_set(c, 1000), args.max_tokens, c, args.client_processes).row())
    else:
        from jkv.server import warm_up

        engine = build_engine(args, max(args.concurrency))
        vocab = engine.config.vocab_size
        if not args.paced:
            warm_up(engine)
        sets = {c: request_set(c, vocab) for c in args.concurrency}
        run_engine(engine, sets[args.concurrency[0]][:2], args.max_tokens, 2)  # the prefill bucket, compiled
        rows += [run_engine(engine, sets[c], args.max_tokens, c).row() for c in args.concurrency]
        url, stop = start_server(engine, IdTokenizer(vocab))
        trace, untrace = ttft_trace.instrument(engine) if args.trace_ttft else (None, None)
        try:
            drive(url, sets[args.concurrency[0]][:2], args.max_tokens, 2, 1)  # the server's first requests
            for c in args.concurrency:
                level = drive(url, sets[c], args.max_tokens, c, args.client_processes)
                rows.append(level.row())
                if trace is not None:
                    rows[-1]["ttft_trace"] = ttft_trace.report(trace, level.log)
                    print("\n".join(ttft_trace.lines(c, rows[-1]["ttft_trace"])), flush=True)
        finally:
            stop()
            if untrace is not None:
                untrace()
        rows.sort(key=lambda r: (r["concurrency"], r["mode"]))
    print("\n".join(compare(rows)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
