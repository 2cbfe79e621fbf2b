"""Host-side cost of jkv's jitted steps: per-call dispatch of a cache step and of a tiny model's engine step.

    python scripts/bench_dispatch.py

A jitted step whose program carries an effect (for example a ``checkify`` check) is dispatched by JAX's Python
path instead of its C++ fast path; this script shows what a step costs the host, on a model so small that the
device work is negligible, so a regression in dispatch shows up directly.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jkv
from jkv.models import llama
from jkv.serving import Engine, SamplingParams


def per_call_us(step, cache, k, reps=2000):
    """Mean host-to-result time of ``cache = step(cache, k)`` (cache donated, so nothing is copied)."""
    cache = jax.block_until_ready(step(cache, k))
    t0 = time.perf_counter()
    for _ in range(reps):
        cache = step(cache, k)
    jax.block_until_ready(cache)
    return (time.perf_counter() - t0) / reps * 1e6


def main():
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, max_len=4096)
    cache = jkv.KVCache.init(spec, 2)
    k = jnp.ones((2, 2, 1, 16))
    step = jax.jit(lambda c, k: c.begin(1).write(0, k, k).write(1, k, k).rollback(c.lengths), donate_argnums=0)
    print(
        f"{jax.devices()[0].device_kind}: jitted begin + write x2 + rollback: {per_call_us(step, cache, k):.1f} us/call"
    )
    config = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 16)
    params = llama.init_params(config, jax.random.key(0), jnp.float32, scale=0.2)
    engine = Engine(params, config, num_slots=1, max_len=128, verbose=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, size=16).tolist() for _ in range(8)]
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4), show_progress=False)
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=32), show_progress=False)
    n = sum(len(o) for o in out)
    print(f"engine, 2-layer toy model, 1 slot: {(time.perf_counter() - t0) / n * 1e3:.2f} ms per generated token")


if __name__ == "__main__":
    main()
