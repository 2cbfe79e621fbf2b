"""Where a decode step's time goes on the GPU: kernel time vs gaps between kernels, and the heaviest kernels.

Runs the compiled greedy decode step of a model shape (random bf16 weights) in a device loop, as
``scripts/bench_decode.py`` does, under ``torch.profiler`` (CUPTI sees every kernel of the process, JAX's included),
and prints per step: wall time, number of kernels, summed kernel time (busy), the rest (launch gaps and idle), and
the kernels that take the most time. Set ``XLA_FLAGS`` outside to compare XLA options (e.g. command buffers).

    python scripts/profile_step.py --model smollm2-135m --batch 1 --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jkv.models import llama
from jkv.serving import Generator, SamplingParams

MODELS = {
    "smollm2-135m": llama.LlamaConfig.smollm2_135m,
    "llama3-8b": llama.LlamaConfig.llama3_8b,
    "tiny": lambda: llama.LlamaConfig(512, 128, 256, 2, 4, 2, 32),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--impl", choices=["pallas", "xla"], default=None)
    ap.add_argument("--cache", default="bf16", help="a jkv.serving.cache_kinds() name (bf16, paged, q8, ...)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--sequence", type=int, default=0, help="print the first N kernels of one step, in order")
    ap.add_argument("--splits", type=int, help="override the contiguous decode kernel's split count")
    ap.add_argument("--norm-kernel", action="store_true", help="llama.LlamaOptions.norm_kernel on")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    if args.splits:
        from pallas_kernels import common as kernel_common

        default_config = kernel_common.decode_config
        kernel_common.decode_config = lambda *a, **k: default_config(*a, **k)._replace(num_splits=args.splits)
    config = MODELS[args.model]()
    params = llama.init_params(config, jax.random.key(0), jnp.bfloat16, scale=0.02, layout="layers")
    gen = Generator(
        config,
        params,
        max_len=args.max_len,
        batch=args.batch,
        cache=args.cache,
        options=llama.LlamaOptions(args.impl, args.norm_kernel),
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    out = gen.generate(prompts, max_new_tokens=args.steps, stop_ids=())
    step, rows = gen.decode_step_compiled()
    tokens = jnp.asarray([t[-1] for t in out.tokens], jnp.int32)
    for p in prompts:  # fill the slots with the prompts (prefill only): the loop decodes over prompt-long rows
        gen.engine.submit(p, SamplingParams(max_new_tokens=args.steps))
    gen.engine.admit()
    start = jnp.full((args.batch,), args.prompt, jnp.int32)

    def loop(tokens):
        for _ in range(args.steps):
            tokens, gen.cache = step(params, gen.cache, tokens, *rows)
        tokens.block_until_ready()
        gen.cache = gen.cache.rollback(start)
        return tokens

    tokens = loop(tokens)  # warm
    t = time.perf_counter()
    tokens = loop(tokens)
    wall_ms = 1e3 * (time.perf_counter() - t) / args.steps
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loop(tokens)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        print("torch.profiler saw no CUDA kernels of this process (CUPTI unavailable?)")
        return
    busy_us = sum(e.device_time for e in kernels) / args.steps
    first = min(e.time_range.start for e in kernels)
    last = max(e.time_range.end for e in kernels)
    span_ms = (last - first) / 1e3 / args.steps
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    sequence = [
        {"name": e.name[:100], "us": e.device_time, "gap_us": e.time_range.start - prev.time_range.end}
        for prev, e in itertools.pairwise(ordered[: args.sequence + 1])
    ]
    report = {
        "model": args.model,
        "batch": args.batch,
        "cache": args.cache,
        "norm_kernel": args.norm_kernel,
        "device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "wall_ms_per_step": wall_ms,
        "profiled_span_ms_per_step": span_ms,
        "kernels_per_step": len(kernels) / args.steps,
        "busy_ms_per_step": busy_us / 1e3,
        "idle_ms_per_step": span_ms - busy_us / 1e3,
        "top": [
            {"name": n[:100], "calls_per_step": c / args.steps, "us_per_step": us / args.steps} for n, (c, us) in top
        ],
        "sequence": sequence,
    }
    print(
        f"{args.model} batch {args.batch} {args.cache}: wall {wall_ms:.3f} ms/step, profiled {span_ms:.3f} ms/step, "
        f"{report['kernels_per_step']:.0f} kernels/step, busy {busy_us / 1e3:.3f} ms, "
        f"idle {report['idle_ms_per_step']:.3f} ms  (XLA_FLAGS={report['xla_flags']!r})"
    )
    for row in report["top"]:
        print(f"  {row['us_per_step']:8.1f} us  x{row['calls_per_step']:5.1f}  {row['name']}")
    if sequence:
        print(f"  first {len(sequence)} kernels after the step's first (us, gap before it):")
    for row in sequence:
        print(f"  {row['us']:7.1f} {row['gap_us']:6.1f}  {row['name']}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
