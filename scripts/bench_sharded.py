"""Sharded decode benchmark: tokens/s and per-GPU memory at several tensor-parallel sizes.

    python scripts/bench_sharded.py --runs llama3-8b:1 llama3-8b:2 llama3-70b:2 --out sharded.json

Each run is MODEL:TP (random bf16 weights of the published shapes, generated directly in their shards, so a
model larger than one GPU never has to fit one). For each: prefill ``--prompt-len`` tokens (0: none), then time
``--steps`` greedy decode steps of one jitted, cache-donating step (the sampled ids stay on the device between
steps; one sync at the end). Roofline: the weight bytes each GPU reads per step over the device-to-device copy
bandwidth measured in the same run (bytes read + written by a large copy), i.e. the fastest a step can be when it
must read every weight once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jkv
from jkv import parallel
from jkv.caches import cache_sharding, shard_cache
from jkv.models import llama

SHAPES = {
    "llama3-8b": llama.LlamaConfig.llama3_8b,
    "llama3-70b": lambda: llama.LlamaConfig(
        128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 500000.0, rope_llama3=(8.0, 1.0, 4.0, 8192)
    ),
    "smollm2-135m": llama.LlamaConfig.smollm2_135m,
}


def copy_bandwidth(device, nbytes=2 << 30, reps=20) -> float:
    """Bytes read + written per second by a device-to-device copy on ``device``.

    The copies are chained (each reads the last one's output) and timed together with one sync at the end, so
    host dispatch overlaps device work instead of adding to every copy.
    """
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    f = jax.jit(lambda a: a * 1.0000001)  # one read, one write, not elided
    y = f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        y = f(y)
    y.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def run_one(model: str, tp: int, args, bandwidth: float) -> dict:
    config = SHAPES[model]()
    mesh = parallel.make_mesh(tp=tp, dp=1)
    t0 = time.perf_counter()
    params = llama.init_params_sharded(config, jax.random.key(0), mesh, jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, args.max_len, jnp.bfloat16)
    cache = shard_cache(jkv.KVCache.init(spec, args.batch), mesh)
    shardings = cache_sharding(cache, mesh)
    impl = args.impl

    def prefill(p, c, t):
        logits, c = llama.prefill(p, c, t, config=config, options=llama.LlamaOptions(impl="xla"))
        return jnp.argmax(logits, -1).astype(jnp.int32), c

    def step(p, c, t):
        logits, c = llama.decode_step(p, c, t, config=config, options=llama.LlamaOptions(impl=impl))
        return jnp.argmax(logits, -1).astype(jnp.int32), c

    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, size=(args.batch, max(args.prompt_len, 1))), jnp.int32)
    with parallel.use_mesh(mesh):
        if args.prompt_len:
            tok, cache = jax.jit(prefill, donate_argnums=1, out_shardings=(None, shardings))(params, cache, prompt)
        else:  # decode from an empty cache: weight reads dominate a step at short context anyway
            tok = prompt[:, 0]
        decode = jax.jit(step, donate_argnums=1, out_shardings=(None, shardings))
        t0 = time.perf_counter()
        tok, cache = decode(params, cache, tok)
        tok.block_until_ready()
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            tok, cache = decode(params, cache, tok)
        tok.block_until_ready()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tok, cache = decode(params, cache, tok)
        tok.block_until_ready()
        step_s = (time.perf_counter() - t0) / args.steps
    cache.check()
    weight_bytes = params.decode_bytes()
    # Bytes of weights each GPU holds; a step reads all of them but the embedding table (one row per token),
    # unless the embedding doubles as the LM head.
    held = {d: 0 for d in mesh.devices.flat}
    embed = {d: 0 for d in mesh.devices.flat}
    for leaf in jax.tree_util.tree_leaves(params):
        for s in leaf.addressable_shards:
            held[s.device] += s.data.nbytes
    for s in params.embed.addressable_shards:
        embed[s.device] += s.data.nbytes
    untied = params.lm_head is not None
    read_per_step = max(held[d] - (embed[d] if untied else 0) for d in held)
    roofline_s = read_per_step / bandwidth
    mem = [d.memory_stats() or {} for d in mesh.devices.flat]
    row = {
        "model": model,
        "tp": tp,
        "batch": args.batch,
        "params_GB": weight_bytes / 1e9,
        "weights_per_gpu_GB": max(held.values()) / 1e9,
        "weights_read_per_gpu_per_step_GB": read_per_step / 1e9,
        "gpu_mem_in_use_GB": [m.get("bytes_in_use", 0) / 1e9 for m in mem],
        "gpu_mem_peak_GB": [m.get("peak_bytes_in_use", 0) / 1e9 for m in mem],
        "init_s": init_s,
        "compile_s": compile_s,
        "ms_per_token": step_s * 1e3,
        "tokens_per_s": args.batch / step_s,
        "roofline_ms": roofline_s * 1e3,
        "roofline_fraction": roofline_s / step_s,
    }
    del params, cache
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["llama3-8b:1", "llama3-8b:2", "llama3-70b:2"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64, help="0: no prefill (saves compiling it)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--impl", choices=["pallas", "xla"], default=None)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    devices = jax.devices()
    bandwidth = copy_bandwidth(devices[0])
    print(f"{len(devices)} x {devices[0].device_kind}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for run in args.runs:
        model, tp = run.split(":")
        try:
            row = run_one(model, int(tp), args, bandwidth)
        except Exception as e:  # report and go on: a later run may still fit
            row = {"model": model, "tp": int(tp), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nmodel        tp  weights/GPU GB  ms/token  tokens/s  roofline ms  of roofline  compile s")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['tp']:>2}  {r['error']}")
            continue
        print(
            f"{r['model']:<12} {r['tp']:>2}  {r['weights_per_gpu_GB']:14.1f}  {r['ms_per_token']:8.2f}  "
            f"{r['tokens_per_s']:8.1f}  {r['roofline_ms']:11.2f}  {r['roofline_fraction']:10.0%}  {r['compile_s']:9.1f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": devices[0].device_kind, "copy_TBps": bandwidth / 1e12, "argv": sys.argv, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
