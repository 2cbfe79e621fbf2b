"""Engine benchmark: throughput and latency at several concurrencies, prefix-cache hits, speculative decoding.

    python scripts/bench_engine.py --model smollm2-135m --concurrency 1 4 16 32 --out engine.json
    python scripts/bench_engine.py --model llama3-8b --concurrency 1 4 16 32
    python scripts/bench_engine.py --gguf path/to/model.gguf --only speculative   # real weights: real acceptance

Models named by shape use random bf16 weights of the published shapes (the GPU machine reaches no model hub);
``--gguf`` loads real weights. Every phase warms up (compiles) before it is timed; compile time is reported apart.

* throughput: ``--requests`` requests of ``--prompt-len`` random tokens and ``--max-new-tokens`` new tokens each,
  through an engine with ``num_slots = concurrency``: generated tokens / wall time, and per-request latency.
* prefix cache: requests sharing a ``--prefix-len``-token prefix, with the prefix cache off and on: prefill time and
  the prompt tokens actually computed.
* speculative: prompts that repeat a passage (copying), greedy with and without prompt-lookup drafts: acceptance
  rate, tokens per model step, and speedup. With random weights the acceptance rate says nothing about real text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkv import xla_flags
from jkv.models import llama
from jkv.serving import CACHE_KINDS, Engine, SamplingParams

SHAPES = {"smollm2-135m": llama.LlamaConfig.smollm2_135m, "llama3-8b": llama.LlamaConfig.llama3_8b}


def load_model(args):
    if args.gguf:
        from jkv.loading import load

        loaded = load(args.gguf, args.dtype, progress=False)
        return loaded.config, loaded.params, loaded.tokenizer, f"{loaded.source} (real weights)"
    config = SHAPES[args.model]()
    dtype = jnp.bfloat16 if args.dtype in (None, "bf16") else jnp.float32
    params = llama.init_params(config, jax.random.key(0), dtype)
    jax.block_until_ready(params)
    return config, params, None, f"{args.model}-shaped, random {jnp.dtype(dtype).name} weights"


def run_requests(engine: Engine, prompts, params: SamplingParams):
    t0 = time.perf_counter()
    for p in prompts:
        engine.submit(p, params)
    done = engine.run(show_progress=False)
    wall = time.perf_counter() - t0
    return done, wall


def throughput(args, config, params, rng):
    rows = []
    sp = SamplingParams(max_new_tokens=args.max_new_tokens)
    for c in args.concurrency:
        engine = Engine(
            params, config, num_slots=c, max_len=args.max_len, impl=args.impl, cache=args.cache, verbose=False
        )
        warm = [rng.integers(0, config.vocab_size, size=args.prompt_len).tolist() for _ in range(c)]
        t0 = time.perf_counter()
        run_requests(engine, warm, SamplingParams(max_new_tokens=3))
        compile_s = time.perf_counter() - t0
        prompts = [rng.integers(0, config.vocab_size, size=args.prompt_len).tolist() for _ in range(args.requests)]
        done, wall = run_requests(engine, prompts, sp)
        tokens = sum(len(d.tokens) for d in done)
        lat = [d.latency for d in done]
        row = {
            "concurrency": c,
            "requests": len(done),
            "generated_tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "latency_p50_s": statistics.median(lat),
            "latency_p90_s": float(np.percentile(lat, 90)),
            "ttft_p50_s": statistics.median(d.time_to_first_token for d in done),
            "decode_steps": engine.stats.decode_steps,
            "warmup_compile_s": compile_s,
        }
        rows.append(row)
        print(
            f"  concurrency {c:3d}: {row['tokens_per_s']:9.1f} tok/s  latency p50 {row['latency_p50_s']:.3f} s  "
            f"p90 {row['latency_p90_s']:.3f} s  (warm-up incl. compile {compile_s:.1f} s)",
            flush=True,
        )
    return rows


def prefix_cache(args, config, params, rng):
    prefix = rng.integers(0, config.vocab_size, size=args.prefix_len).tolist()
    tails = [rng.integers(0, config.vocab_size, size=16).tolist() for _ in range(8)]
    prompts = [prefix + t for t in tails]
    sp = SamplingParams(max_new_tokens=8)
    result = {}
    for name, budget in (("off", 0), ("on", 1 << 30)):
        engine = Engine(
            params,
            config,
            num_slots=4,
            max_len=args.max_len,
            impl=args.impl,
            cache=args.cache,
            prefix_cache_bytes=budget,
            verbose=False,
        )
        # Warm-up compiles every shape both runs use (prefill buckets, prefix-cache entries and restores: a hit on
        # an entry of a new shape compiles once), then fills the prefix cache with the shared prefix.
        run_requests(engine, [prefix + [1] * 16, prefix], SamplingParams(max_new_tokens=2))
        run_requests(engine, [prefix + [2] * 16, prefix + [3] * 16], SamplingParams(max_new_tokens=2))
        run_requests(engine, [[2] * 16], SamplingParams(max_new_tokens=2))
        before = engine.stats.prefill_tokens
        done, wall = run_requests(engine, prompts, sp)
        result[name] = {
            "wall_s": wall,
            "ttft_p50_s": statistics.median(d.time_to_first_token for d in done),
            "prefill_tokens_computed": engine.stats.prefill_tokens - before,
            "tokens": [d.tokens for d in done],
        }
    same = result["on"]["tokens"] == result["off"]["tokens"]
    for r in result.values():
        r.pop("tokens")
    speedup = result["off"]["ttft_p50_s"] / result["on"]["ttft_p50_s"]
    print(
        f"  prefix {args.prefix_len} tokens: computed {result['off']['prefill_tokens_computed']} -> "
        f"{result['on']['prefill_tokens_computed']} prompt tokens; TTFT p50 {result['off']['ttft_p50_s'] * 1e3:.1f} -> "
        f"{result['on']['ttft_p50_s'] * 1e3:.1f} ms ({speedup:.2f}x); same tokens: {same}",
        flush=True,
    )
    return {"prefix_len": args.prefix_len, "same_tokens": same, "ttft_speedup": speedup, **result}


def copy_prompts(config, tokenizer, rng, n=4):
    if tokenizer is not None:
        passages = [
            "def area(radius):\n    return 3.14159 * radius * radius\n\ndef perimeter(radius):\n"
            "    return 2 * 3.14159 * radius\n",
            "The quick brown fox jumps over the lazy dog. The dog wakes up and chases the fox around the farm.",
            "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
            "for i in range(10):\n    total += values[i] * weights[i]\nprint(total / sum(weights))\n",
        ]
        texts = [f"Repeat the following text exactly.\n\n{p}\n\nRepeated text:\n{p[:20]}" for p in passages[:n]]
        return [tokenizer.encode(t, add_eos=False) for t in texts]
    out = []
    for _ in range(n):
        passage = rng.integers(0, config.vocab_size, size=48).tolist()
        out.append(passage + passage[:8])
    return out


def speculative(args, config, params, tokenizer, rng):
    prompts = copy_prompts(config, tokenizer, rng)
    sp = SamplingParams(max_new_tokens=args.max_new_tokens)
    result = {}
    for name, k in (("greedy", 0), ("speculative", args.draft_tokens)):
        engine = Engine(
            params,
            config,
            num_slots=1,
            max_len=args.max_len,
            impl=args.impl,
            cache=args.cache,
            speculative_tokens=k,
            verbose=False,
        )
        run_requests(engine, prompts[:1], SamplingParams(max_new_tokens=k + 3))  # compile
        engine.stats = type(engine.stats)()
        done, wall = run_requests(engine, prompts, sp)
        tokens = sum(len(d.tokens) for d in done)
        steps = engine.stats.decode_steps + engine.stats.verify_steps
        result[name] = {
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "tokens_per_step": tokens / max(steps, 1),
            "acceptance_rate": engine.stats.acceptance_rate,
            "tokens": [d.tokens for d in done],
        }
    same = result["greedy"]["tokens"] == result["speculative"]["tokens"]
    for r in result.values():
        r.pop("tokens")
    speedup = result["speculative"]["tokens_per_s"] / result["greedy"]["tokens_per_s"]
    print(
        f"  speculative k={args.draft_tokens}: acceptance {result['speculative']['acceptance_rate']:.2f}, "
        f"{result['speculative']['tokens_per_step']:.2f} tokens/step, {result['greedy']['tokens_per_s']:.1f} -> "
        f"{result['speculative']['tokens_per_s']:.1f} tok/s ({speedup:.2f}x); same tokens as greedy: {same}",
        flush=True,
    )
    return {"draft_tokens": args.draft_tokens, "same_tokens": same, "speedup": speedup, **result}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--gguf", help="load real weights from this GGUF file instead of random ones")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None)
    ap.add_argument("--impl", choices=["pallas", "xla"], default=None)
    ap.add_argument("--cache", choices=["default", *CACHE_KINDS], default="default", help="the slots' cache kind")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--only", choices=["throughput", "prefix", "speculative"], nargs="+")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--default-xla-flags", action="store_true", help="do not add jkv.xla_flags.GPU_FLAGS to XLA_FLAGS")
    args = ap.parse_args(argv)
    if not args.default_xla_flags:
        xla_flags.apply_recommended()  # what `jkv generate` runs with; recorded in the output
    only = set(args.only or ["throughput", "prefix", "speculative"])

    config, params, tokenizer, name = load_model(args)
    device = jax.devices()[0].device_kind
    print(f"jkv engine benchmark: {name} on {device} (impl={args.impl or 'default'}, cache={args.cache})", flush=True)
    rng = np.random.default_rng(0)
    report = {
        "model": name,
        "device": device,
        "cache": args.cache,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d"),
    }
    if "throughput" in only:
        report["throughput"] = throughput(args, config, params, rng)
    if "prefix" in only:
        report["prefix_cache"] = prefix_cache(args, config, params, rng)
    if "speculative" in only:
        report["speculative"] = speculative(args, config, params, tokenizer, rng)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
