"""A refused operation under ``jit`` sets its error bit and leaves the cache bit-identical (every array, every
length, every page reference), on every kind in a lived-in state: written random data, a fork sharing pages, a
pinned prefix, rings after wrap-around, per-layer plans. Other sequences do nothing in the same call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv.caches import CacheSpec, PagedKVCache, Ring

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


def _lived_in(name):
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


def _bits(tree):
    return [np.asarray(x).view(np.uint8).tobytes() for x in jax.tree.leaves(tree)]


def _assert_untouched(before, after, bit, row):
    errors = np.asarray(after.errors)
    assert errors[row] & bit, (errors, bit)
    assert not np.delete(errors, row).any(), errors
    assert _bits(before) == _bits(after.clear_errors())


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
E = jkv.caches


def _past_max_len(c):
    return c.begin(jnp.zeros((B,), jnp.int32).at[1].set(c.max_len - c.lengths[1] + 1)).commit()


def _negative_count(c):
    return c.begin(jnp.zeros((B,), jnp.int32).at[1].set(-1)).commit()


def _rollback_forward(c):
    return c.rollback(c.lengths.at[1].add(1))


def _rollback_negative(c):
    return c.rollback(c.lengths.at[1].set(-1))


def _reset_bad_slot(c):
    return c.reset_slot(jnp.int32(B))


def _fork_bad_dst(c):
    return c.fork(jnp.int32(0), jnp.int32(B))


def _fork_bad_src(c):
    return c.fork(jnp.int32(-1), jnp.int32(1))


def _write_bad_layer(c):  # the step begun and committed, its one write to a layer that does not exist
    k = jnp.ones((B, SPEC.num_kv_heads, 1, SPEC.head_dim), jnp.float32)
    return c.begin(jnp.zeros((B,), jnp.int32)).write(jnp.int32(SPEC.num_layers), k, k).commit()


CASES = {
    "past-max-len": (_past_max_len, E.ERR_WRITE_OVERFLOW, 1),
    "negative-count": (_negative_count, E.ERR_BAD_COUNT, 1),
    "rollback-forward": (_rollback_forward, E.ERR_ROLLBACK_FORWARD, 1),
    "rollback-negative": (_rollback_negative, E.ERR_ROLLBACK_FORWARD, 1),
    "reset-bad-slot": (_reset_bad_slot, E.ERR_BAD_SLOT, None),
    "fork-bad-dst": (_fork_bad_dst, E.ERR_BAD_SLOT, None),
    "fork-bad-src": (_fork_bad_src, E.ERR_BAD_SLOT, None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", KINDS)
def test_refused_op_leaves_cache_bit_identical(name, case):
    cache = _lived_in(name)
    op, bit, row = CASES[case]
    after = jax.jit(op)(cache)
    errors = np.asarray(after.errors)
    if row is None:  # a bad slot names no sequence: every one is flagged
        assert np.all(errors & bit), errors
        assert _bits(cache) == _bits(after.clear_errors())
    else:
        _assert_untouched(cache, after, bit, row)


@pytest.mark.parametrize("name", ["f32", "paged", "ring-pooled"])
def test_bad_layer_write_touches_nothing(name):
    cache = _lived_in(name)
    after = jax.jit(_write_bad_layer)(cache)
    assert np.all(np.asarray(after.errors) & E.ERR_BAD_LAYER)
    assert _bits(cache) == _bits(after.clear_errors())


def test_pooled_ring_refused_for_pages_keeps_its_ring():
    """A pooled (unbounded) ring whose step the pool refuses keeps the pages behind its window: a rollback of up to
    ``slack`` positions still succeeds after the refused step, as it does without it."""
    ring = Ring(4, 2, bounded=False)
    spec = CacheSpec(1, 1, 4, 32)
    cache = PagedKVCache.init(spec, 2, page_size=4, num_pages=4, ring=ring)
    rng = np.random.default_rng(3)
    step = jax.jit(lambda c, n, k: c.begin(n).write(0, k, k).commit())
    for counts in ([2, 0], [2, 0], [2, 0], [2, 0], [0, 8]):
        k = jnp.asarray(rng.standard_normal((2, 1, 8, 4)), jnp.float32)
        cache = step(cache, jnp.asarray(counts, jnp.int32), k).check()
    refused = jax.jit(lambda c: c.begin(jnp.asarray([8, 0], jnp.int32)).commit())(cache)
    _assert_untouched(cache, refused, E.ERR_POOL_EXHAUSTED, 0)
    back = jax.jit(lambda c: c.rollback(jnp.asarray([6, 8], jnp.int32)))(refused.clear_errors())
    np.testing.assert_array_equal(back.lengths, [6, 8])
    back.check()
    with pytest.raises(ValueError, match="page pool exhausted"):
        cache.begin(jnp.asarray([8, 0], jnp.int32))


def test_plan_ring_keeps_its_pages_when_another_pool_refuses():
    """A paged plan of two rings: the window-9 pool refuses a step the window-5 pool could serve. The window-5 ring
    must not have given back its pages for it: the plan is untouched and a rollback within slack still succeeds."""
    spec = CacheSpec(3, 1, 8, 32)
    cache = jkv.caches.make_cache(
        "paged", spec, 2, windows=(None, 5, 9), slack=2, page_size=4, num_pages=16, window_pages=7
    )
    rng = np.random.default_rng(5)
    step = jax.jit(lambda c, n, k: c.begin(n).write(0, k, k).write(1, k, k).write(2, k, k).commit())
    for counts in [[2, 2]] * 6 + [[0, 0]]:
        k = jnp.asarray(rng.standard_normal((2, 1, 2, 8)), jnp.float32)
        cache = step(cache, jnp.asarray(counts, jnp.int32), k).check()
    refused = jax.jit(lambda c: c.begin(jnp.asarray([9, 0], jnp.int32)).commit())(cache)
    _assert_untouched(cache, refused, E.ERR_POOL_EXHAUSTED, 0)
    back = jax.jit(lambda c: c.rollback(jnp.asarray([10, 12], jnp.int32)))(refused.clear_errors())
    np.testing.assert_array_equal(back.lengths, [10, 12])
    back.check()
