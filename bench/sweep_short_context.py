"""Decode attention at the short contexts a model step sees: a sweep of launch parameters on one GPU.

``bench/bench_attention.py`` measures full caches (every sequence at ``T``). A decode step of a model usually
attends over far fewer positions than its cache holds (a 512-position cache 192 tokens in); there the kernel is
bound by latency, not bandwidth, and the best block size, splits, warps and stages differ. For each case
``B x S @ n`` (batch, cache positions, valid positions per sequence; bf16, N=32, K=8, D=128, as Llama-3-8B) this
times the default launch, then block sizes x splits (4 warps, 3 stages), then warps x stages around the best,
and the XLA reference, all in one run. Timing: ``bench/common.py`` (chained calls, profiler spans).

    python bench/sweep_short_context.py --cases 1x512@192 8x512@192 1x2048@1100 --out $OUT/short.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench.common import HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, rel_err, time_jax
from pallas_kernels import common, decode, reference


def parse_case(text: str) -> tuple[int, int, int]:
    shape, _, n = text.partition("@")
    b, s = (int(x) for x in shape.split("x"))
    n = int(n) if n else s
    if not 1 <= n <= s:
        raise argparse.ArgumentTypeError(f"case {text!r}: need 1 <= valid positions <= cache positions")
    return b, s, n


def inputs(batch: int, seq: int, n: int, copies: int):
    key = jax.random.key(0)
    sets = []
    for i in range(copies):
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, i), 3)
        q = jax.random.normal(kq, (batch, NUM_Q_HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, NUM_KV_HEADS, seq, HEAD_DIM), jnp.bfloat16)
        sets.append((q, k, v, jnp.full((batch,), n, jnp.int32)))
    return sets


def sweep_case(batch: int, seq: int, n: int, log) -> dict:
    sets = inputs(batch, seq, n, copies=4)
    q, k, v, lengths = sets[0]
    ref = reference.decode_attention_reference(q, k, v, lengths)
    default = common.decode_config(batch, NUM_KV_HEADS, seq, HEAD_DIM, jnp.bfloat16)
    rows = []

    def measure(name, fn):
        err = rel_err(fn(q, k, v, lengths), ref)
        t = time_jax(fn, sets, est_s=10e-6)
        rows.append({"variant": name, "us": 1e6 * t["time_s"], "spread_us": 1e6 * t["spread_s"], "rel_err": err})
        log(f"  {batch}x{seq}@{n} {name:<34} {rows[-1]['us']:7.2f} us  (err {err:.1e})")
        return rows[-1]["us"]

    def kernel(config):
        return lambda q, k, v, lengths: decode.decode_attention(q, k, v, lengths, **config._asdict())

    measure("xla_ref", jax.jit(reference.decode_attention_reference))
    measure(f"default {tuple(default)[:4]}", kernel(default))
    best = (float("inf"), default)
    for block_k, splits in itertools.product((32, 64, 128), (1, 2, 4, 8)):
        if block_k > seq:
            continue
        config = default._replace(block_k=block_k, num_splits=splits, num_warps=4, num_stages=3)
        best = min(best, (measure(f"block {block_k} splits {splits}", kernel(config)), config), key=lambda x: x[0])
    base = best[1]
    for warps, stages in itertools.product((1, 2, 4, 8), (1, 2, 3, 4)):
        if (warps, stages) == (base.num_warps, base.num_stages):
            continue
        config = base._replace(num_warps=warps, num_stages=stages)
        best = min(best, (measure(f"{tuple(config)[:4]}", kernel(config)), config), key=lambda x: x[0])
    return {"batch": batch, "seq": seq, "valid": n, "default": list(default), "best": list(best[1]), "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[(1, 512, 192), (8, 512, 192)])
    parser.add_argument("--out", type=Path, default=Path("short_context.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "cases": []}
    for case in args.cases:
        report["cases"].append(sweep_case(*case, log))
        args.out.write_text(json.dumps(report, indent=1))
    print("\ncase | default us | best us | best (block, splits, warps, stages) | xla_ref us")
    for c in report["cases"]:
        by = {r["variant"]: r["us"] for r in c["rows"]}
        default_us = next(r["us"] for r in c["rows"] if r["variant"].startswith("default"))
        best_us = min(r["us"] for r in c["rows"] if r["variant"] != "xla_ref")
        print(
            f"{c['batch']}x{c['seq']}@{c['valid']} | {default_us:.2f} | {best_us:.2f} | {c['best'][:4]} | "
            f"{by['xla_ref']:.2f}"
        )


if __name__ == "__main__":
    main()
