"""End-to-end serving (issue 21): jkv's engine and HF transformers' continuous batching on three workloads, each
against the ideal time of its work, measured in the same run.

    python bench/bench_engine.py --model llama3-8b --out docs/bench_engine.json    # the GPU runs
    python bench/bench_engine.py --smoke --no-hf                                   # CPU, a tiny model, seconds

Workloads (random prompt tokens, greedy, no stop token; ``--smoke`` scales every count down):

* mixed: 256 requests submitted at once, prompts uniform in [64, 512] tokens, 128 new tokens each, 64 slots;
* long: 64 requests, prompts uniform in [8k, 16k] tokens, 128 new tokens;
* shared: 256 requests, a 2k-token system prompt shared by all plus a question of [16, 64] tokens, 128 new
  tokens; jkv with its prefix cache on and off.

``--weights bf16 q8_0 q4_k`` runs the engine once per weight format on each workload (issue 26: random planes
of the model's shape in the formats ``--quantize`` gives, ``bench_qweights.random_quantized``), as runs
``jkv``, ``jkv_q8_0``, ``jkv_q4_k``; each run's ideal time counts its own weight bytes.

The engine runs with the XLA flags ``jkv generate`` and ``jkv serve`` apply (``jkv.xla_flags``: whole steps as
CUDA graphs, the layer loop included); ``--default-xla-flags`` leaves ``XLA_FLAGS`` alone.

Ideal time of a workload: every decode step reads the weights once (the bytes a step reads: every layer, the
norm, the LM head) (``ceil(requests / slots) * new_tokens``
steps), every generated token reads its sequence's K/V, both at the copy bandwidth measured here; the prompt
tokens that must run (a prefix-cache hit skips its tokens) cost their matmul and causal-attention FLOPs at the bf16
matmul rate measured here. The fraction printed is ideal / measured time. Models named by shape use random
weights (the GPU machine reaches no model hub); every engine warms up (compiles every step variant) first, and
compile time is reported apart.

Waves: with every request generating the same number of tokens, ``ceil(requests / slots)`` waves run one after the
other, and wave ``k`` can start only once wave ``k - 1`` has finished. ``ttft_waves_s`` is the mean time to first
token that leaves even at the ideal time (wave ``k`` waits ``k / waves`` of it; the waves' own prefill not counted):
no order of service beats it with that many slots. ``--slots N`` runs every workload with ``N`` slots instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the same process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, engine_profile, hf_llama
from bench.bench_qweights import random_quantized
from jkv.caches.registry import whole_pages
from jkv.models import llama
from jkv.serving import CACHE_KINDS, Engine, SamplingParams

SHAPES = {"smollm2-135m": llama.LlamaConfig.smollm2_135m, "llama3-8b": llama.LlamaConfig.llama3_8b}
WEIGHTS = ("bf16", "q8_0", "q4_k")  # bf16: the model's dtype (float32 in the smoke run)
SMOKE_CONFIG = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32, max_position=1024)

# name: (requests, prompt length range, new tokens, slots, shared prefix length)
WORKLOADS = {
    "mixed": (256, (64, 512), 128, 64, 0),
    "long": (64, (8192, 16384), 128, 64, 0),
    "shared": (256, (16, 64), 128, 64, 2048),
}
SMOKE_WORKLOADS = {
    "mixed": (12, (4, 24), 6, 4, 0),
    "long": (4, (40, 80), 4, 4, 0),
    "shared": (12, (2, 6), 6, 4, 32),
}


# ---------------------------------------------------------------------------------------------- the work
def make_prompts(rng, config, workload):
    n, (lo, hi), _, _, shared = workload
    system = rng.integers(0, config.vocab_size, size=shared).tolist()
    return [system + rng.integers(0, config.vocab_size, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


def matmul_params(config) -> int:
    """Weights a token multiplies through in the blocks (embedding and LM head left out)."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    attn = h * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * h
    return config.num_layers * (attn + 3 * h * f)


def ideal_seconds(config, prompts, new_tokens, slots, cached, weight_bytes, kv_bytes_per_token, bandwidth, flops):
    """``(seconds, parts)`` of a workload's ideal time (module docstring); ``cached[i]``: prompt ``i``'s tokens a
    prefix-cache hit skips."""
    steps = math.ceil(len(prompts) / slots) * new_tokens
    kv_tokens = sum(len(p) * new_tokens + new_tokens * (new_tokens - 1) // 2 for p in prompts)
    run = [(len(p), c) for p, c in zip(prompts, cached, strict=True)]
    per_pair = 4 * config.num_layers * config.num_heads * config.head_dim  # q.k and p.v, per (query, key) pair
    prompt_flops = sum(
        2 * matmul_params(config) * (n - c) + per_pair * (n * (n + 1) - c * (c + 1)) // 2 for n, c in run
    )
    parts = {
        "weights_s": steps * weight_bytes / bandwidth,
        "kv_s": kv_tokens * kv_bytes_per_token / bandwidth,
        "prompt_s": prompt_flops / flops,
    }
    return sum(parts.values()), parts


def copy_bandwidth(nbytes: int, trials: int = 10) -> float:
    """Bytes per second of a device copy (read + write) in JAX."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    copy(x).block_until_ready()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def matmul_rate(n: int, trials: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` bf16 matmul (f32 accumulation)."""
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    mm(a, a).block_until_ready()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


# ---------------------------------------------------------------------------------------------- jkv
def run_jkv(args, config, params, prompts, new_tokens, slots, prefix: bool, num_pages=None, profile=False) -> dict:
    max_len = whole_pages(max(map(len, prompts)) + new_tokens)
    engine = Engine(
        params,
        config,
        num_slots=slots,
        max_len=max_len,
        cache=args.cache,
        impl=args.impl,
        max_batch_tokens=args.max_batch_tokens,
        prefix_cache_bytes=args.prefix_cache_mb << 20 if prefix else 0,
        num_pages=num_pages or args.num_pages,
        verbose=False,
    )
    start = time.perf_counter()
    sampling = args.temperature > 0
    variants = engine.compile_all(progress=not args.smoke, sampling=sampling)  # greedy runs: not the samplers
    compile_s = time.perf_counter() - start
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=args.temperature, top_p=args.top_p)
    for p in prompts[:2]:  # one after the other: the second hits the first's prefix (its copies compile)
        engine.generate([p], SamplingParams(max_new_tokens=2), show_progress=False)
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
    engine.reset_stats()
    compiled = engine.compile_s
    start = time.perf_counter()
    for p in prompts:
        engine.submit(p, sp)
    done = engine.run(show_progress=False)
    wall = time.perf_counter() - start
    s, max_batch_tokens = engine.summary(), engine.scheduler.max_batch_tokens
    compile_while_timed = engine.compile_s - compiled  # should be 0: every shape compiled before
    profiled = None
    if profile and args.profile_steps:  # the decode-only step with every slot busy, after the timed run
        profiled = engine_profile.profile_decode_steps(engine, prompts, new_tokens, args.profile_steps)
    del engine  # its cache pool and prefix cache: freed before the next engine is built (an engine's parts
    gc.collect()  # refer to each other, so only the cycle collector frees them)
    return {
        "wall_s": wall,
        "tokens_per_s": sum(len(c.tokens) for c in done) / wall,
        "mean_ttft_s": statistics.mean(c.time_to_first_token for c in done),
        "mean_queue_s": statistics.mean(c.queue_wait for c in done),  # of which waiting for a slot
        "mean_itl_s": s.mean_itl_s,
        "prefill_tokens_per_s": s.prefill_tokens_per_s,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "prefix_hits": s.prefix_hits,
        "cached_prompt_tokens": [c.cached_prompt_tokens for c in done],
        "peak_pages_in_use": s.peak_pages_in_use,
        "num_pages": s.num_pages,
        "steps": s.steps,
        "step_variants": variants,
        "compile_s": compile_s,
        "compile_s_while_timed": compile_while_timed,
        "max_batch_tokens": max_batch_tokens,
        "summary": s.format(),
        **({"profile": profiled} if profiled else {}),
    }


def reported(run, *args, **kwargs) -> dict:
    """``run(*args, **kwargs)``, or ``{"error": ...}`` when it raises (out of memory, say): the failure is reported
    and the next runs go on, their memory freed of the failed run's first."""
    try:
        return run(*args, **kwargs)
    except Exception as e:
        # where it failed too (the benchmark's own frames and jkv's, innermost last): an out-of-memory names only
        # the executable
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/jax/" not in f.filename]
        where = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[-6:]]
        # and what held the memory then: the live device arrays of 1 GiB or more
        held = sorted((a.nbytes >> 20, f"{a.dtype}{list(a.shape)}") for a in jax.live_arrays() if a.nbytes >= 1 << 30)
        error = {"error": f"{type(e).__name__}: {str(e)[:300]}", "where": where, "live_gib_arrays": held}
        print(f"  failed at {' < '.join(reversed(where))}; arrays of 1 GiB or more (MiB): {held}", file=sys.stderr)
    gc.collect()  # the failed run's engine, held by the traceback until here
    return error


# ---------------------------------------------------------------------------------------------- HF peer
def run_hf(args, config, prompts, new_tokens, slots) -> dict:
    """HF transformers' continuous batching (``generate_batch``) on a random model of the same shape (run it through
    ``reported``: a peer that cannot run is reported, not fatal)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(hf_llama.hf_config(config)).to(dtype).eval()
    sample = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature else {}
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=bool(sample), eos_token_id=-1, pad_token_id=0, **sample)
    model.generate_batch(inputs=prompts[: min(2, len(prompts))], generation_config=gen)  # warm up
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=gen, record_timestamps=True)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    ttft = [o.timestamps[0] - o.created_time for o in out.values() if o.timestamps]
    del model
    return {
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "mean_ttft_s": statistics.mean(ttft) if ttft else math.nan,
        "device": device,
    }


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--smoke", action="store_true", help="a tiny float32 model and small workloads (CPU, seconds)")
    ap.add_argument("--only", choices=sorted(WORKLOADS), nargs="+", help="run these workloads (default: all)")
    ap.add_argument("--cache", choices=CACHE_KINDS, default="paged", help="the engine's cache kind")
    ap.add_argument("--impl", choices=["pallas", "xla"], default=None)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine tokens per step (default: its own)")
    ap.add_argument("--prefix-cache-mb", type=int, default=None, help="prefix cache (default 4096, smoke 1)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--slots", type=int, default=None, help="engine slots for every workload (default: its own)")
    ap.add_argument("--num-pages", type=int, default=None, help="paged pool of every engine (default: the engine's)")
    ap.add_argument(
        "--multi-token-kernel",
        choices=["auto", "triton"],
        default="auto",
        help="auto: Mosaic GPU multi-token kernels where they run (pallas_kernels.dispatch); triton: the Triton ones",
    )
    ap.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["bf16"], help="weight formats, a run each")
    ap.add_argument("--temperature", type=float, default=0.0, help="every request's (0: greedy, the default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's nucleus mass (1: off)")
    ap.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the mixed workload's jkv run, profile this many decode-only steps (bench/engine_profile.py)",
    )
    ap.add_argument("--out", help="write the results as JSON here (after each workload)")
    common.add_xla_flags_option(ap, "`jkv generate` and `jkv serve` do")
    ap.add_argument(
        "--compile-cache",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "jkv_bench_engine_xla"),
        help="JAX's persistent compilation cache: a later run on the same machine reuses the steps ('' = off)",
    )
    args = ap.parse_args(argv)
    if args.slots is not None and args.slots < 1:
        ap.error(f"--slots must be a positive number of slots, got {args.slots}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        ap.error(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    flags = common.apply_xla_flags(args)  # before JAX starts: what the CLI's engines run with
    if args.compile_cache and not args.smoke:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if args.multi_token_kernel == "triton":
        from pallas_kernels import dispatch

        dispatch.MULTI_TOKEN_MGPU = False
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    if args.prefix_cache_mb is None:
        args.prefix_cache_mb = 1 if args.smoke else 4096
    if args.smoke and args.max_batch_tokens is None:
        args.max_batch_tokens = 16  # three step shapes: the smoke run spends its seconds running, not compiling
    if args.smoke:
        config, dtype, name = SMOKE_CONFIG, jnp.float32, "smoke (tiny random float32 Llama)"
    else:
        config, dtype, name = SHAPES[args.model](), jnp.bfloat16, f"{args.model}-shaped, random bf16 weights"
    params = llama.init_params(config, jax.random.key(0), dtype, scale=0.02)
    models = {w: params if w == "bf16" else random_quantized(params, w, seed) for seed, w in enumerate(args.weights)}
    jax.block_until_ready(models)
    weight_bytes = {w: p.decode_bytes() for w, p in models.items()}
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize
    bandwidth = copy_bandwidth(1 << (24 if args.smoke else 31))
    flops = matmul_rate(256 if args.smoke else 8192)
    common.log(
        f"jkv engine benchmark: {name} on {jax.devices()[0].device_kind}; copy {bandwidth / 1e12:.3f} TB/s, "
        f"bf16 matmul {flops / 1e12:.1f} TFLOP/s"
    )
    report = {"model": name, "cache": args.cache, "bandwidth_Bps": bandwidth, "matmul_flops": flops, "workloads": {}}
    report["meta"] = common.meta(None)
    report["xla_flags"] = flags
    rng = np.random.default_rng(0)
    for wname in args.only or list(workloads):
        workload = workloads[wname]
        _, _, new_tokens, slots, shared = workload
        slots = args.slots or slots
        prompts = make_prompts(rng, config, workload)
        runs, formats = {}, {}
        for w, model in models.items():
            name = "jkv" if w == "bf16" else f"jkv_{w}"
            profile = wname == "mixed"
            one = (args, config, model, prompts, new_tokens, slots, bool(shared))
            runs[name] = reported(run_jkv, *one, profile=profile)
            formats[name] = w
            if shared and w == "bf16":
                pool = runs["jkv"].get("num_pages")  # the same pool: the same compiled steps, the same memory
                one = (args, config, model, prompts, new_tokens, slots, False, pool)
                runs["jkv_no_prefix_cache"] = reported(run_jkv, *one)
                formats["jkv_no_prefix_cache"] = w
        if not args.no_hf:
            runs["hf_continuous_batching"] = reported(run_hf, args, config, prompts, new_tokens, slots)
        first = next(iter(formats))
        cached = runs[first].get("cached_prompt_tokens", [0] * len(prompts))  # a failed run: as without hits
        work = (config, prompts, new_tokens, slots, cached)
        ideals = {w: ideal_seconds(*work, weight_bytes[w], kv_per_token, bandwidth, flops) for w in models}
        ideal, parts = ideals[formats[first]]
        waves = math.ceil(len(prompts) / slots)
        entry = {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)), "slots": slots, "ideal_s": ideal}
        entry |= {**parts, "waves": waves, "ttft_waves_s": ideal * (waves - 1) / (2 * waves)}
        common.log(
            f"  {wname}: {len(prompts)} requests in {slots} slots, {waves} waves; at the ideal time "
            f"({ideal:.2f} s) the waves alone make a mean TTFT of {entry['ttft_waves_s']:.2f} s"
        )
        for run_name, run in runs.items():
            if "wall_s" in run:
                run["ideal_s"] = ideal = ideals[formats.get(run_name, formats[first])][0]
                run["ideal_fraction"] = ideal / run["wall_s"]
                common.log(
                    f"  {wname:6s} {run_name:22s} {run['tokens_per_s']:9.1f} tokens/s, mean TTFT "
                    f"{run['mean_ttft_s']:.3f} s, {100 * run['ideal_fraction']:.0f} % of ideal ({ideal:.2f} s)"
                )
                if "summary" in run and not args.smoke:
                    common.log("    " + run["summary"])
            else:
                common.log(f"  {wname:6s} {run_name:22s} {run.get('error')}")
        if shared and all("wall_s" in runs.get(name, {}) for name in ("jkv", "jkv_no_prefix_cache")):
            entry["prefix_cache_speedup"] = runs["jkv_no_prefix_cache"]["wall_s"] / runs["jkv"]["wall_s"]
        entry["runs"] = runs
        report["workloads"][wname] = entry
        if args.out:  # after each workload: a run cut short by its time limit keeps the finished ones
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
