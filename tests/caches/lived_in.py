"""Caches of every kind in a lived-in state, for tests that check what an operation leaves: written random data,
a fork sharing pages, a pinned prefix, rings after wrap-around, per-layer plans."""

import jax
import jax.numpy as jnp
import numpy as np

import jkv
from jkv.caches import CacheSpec, PagedKVCache, Ring

KINDS = [
    "f32",
    "q8",
    "fp8",
    "paged",
    "q8-paged",
    "fp8-paged",
    "ring-bounded",
    "ring-pooled",
    "plan-paged",
    "plan-contiguous",
]
SPEC = CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=24)
B = 3
_begin = jax.jit(lambda c, n: c.begin(n))
_commit = jax.jit(lambda c: c.commit())
_write = jax.jit(lambda c, layer, k: c.write(layer, k, -k), static_argnums=1)


def _step(cache, counts, rng):
    cache = _begin(cache, jnp.asarray(counts, jnp.int32))
    k = jnp.asarray(rng.standard_normal((B, SPEC.num_kv_heads, max(max(counts), 1), SPEC.head_dim)), jnp.float32)
    for layer in range(SPEC.num_layers):
        cache = _write(cache, layer, k)
    return _commit(cache).check()


def lived_in(name):
    rng = np.random.default_rng(7)
    if name.startswith("ring"):  # page_size 4 does not divide the ring's 5 + slack positions; wraps several times
        bounded = name == "ring-bounded"
        cache = PagedKVCache.init(SPEC, B, page_size=4, ring=Ring(6, 3, bounded), num_pages=None if bounded else 16)
        for counts in ([3, 2, 1], [3, 3, 3], [2, 3, 1], [3, 3, 3], [3, 1, 2], [2, 3, 3]):
            cache = _step(cache, counts, rng)
    elif name.startswith("plan"):
        layout = name.split("-")[1]
        cache = jkv.caches.make_cache(
            "paged" if layout == "paged" else "f32", SPEC, B, windows=(5, None), slack=3, page_size=4
        )
        for counts in ([3, 2, 1], [3, 3, 3], [2, 3, 1], [1, 3, 2]):
            cache = _step(cache, counts, rng)
    else:
        options = {"page_size": 4, "num_pages": 12} if "paged" in name else {}
        cache = jkv.caches.make_cache(name, SPEC, B, **options)
        cache = _step(_step(cache, [5, 7, 2], rng), [3, 2, 0], rng)
        if "paged" in name:  # row 2 shares row 0's pages (the last one partly filled); row 1's prefix is pinned
            cache = jax.jit(lambda c: c.fork(0, 2))(cache)
            cache, _ = jax.jit(lambda c: c.pin(1, 6))(cache)
    # A step of count 0 for everyone: a ring gives back what a count-0 step lets go, so the next one changes nothing.
    return _commit(_begin(cache, jnp.zeros((B,), jnp.int32))).check()


def bits(tree):
    return [np.asarray(x).view(np.uint8).tobytes() for x in jax.tree.leaves(tree)]
