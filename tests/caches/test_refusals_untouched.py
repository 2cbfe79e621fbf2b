"""A refused operation under ``jit`` sets its error bit and leaves the cache bit-identical (every array, every
length, every page reference), on every kind in a lived-in state: written random data, a fork sharing pages, a
pinned prefix, rings after wrap-around, per-layer plans. Other sequences do nothing in the same call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lived_in import KINDS, SPEC, B, bits, lived_in

import jkv
from jkv.caches import CacheSpec, PagedKVCache, Ring

E = jkv.caches


def _assert_untouched(before, after, bit, row):
    errors = np.asarray(after.errors)
    assert errors[row] & bit, (errors, bit)
    assert not np.delete(errors, row).any(), errors
    assert bits(before) == bits(after.clear_errors())


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
    cache = lived_in(name)
    op, bit, row = CASES[case]
    after = jax.jit(op)(cache)
    errors = np.asarray(after.errors)
    if row is None:  # a bad slot names no sequence: every one is flagged
        assert np.all(errors & bit), errors
        assert bits(cache) == bits(after.clear_errors())
    else:
        _assert_untouched(cache, after, bit, row)


@pytest.mark.parametrize("name", ["f32", "paged", "ring-pooled"])
def test_bad_layer_write_touches_nothing(name):
    cache = lived_in(name)
    after = jax.jit(_write_bad_layer)(cache)
    assert np.all(np.asarray(after.errors) & E.ERR_BAD_LAYER)
    assert bits(cache) == bits(after.clear_errors())


def _stepped(cache, num_layers: int, steps, k_shape, seed: int):
    """``cache`` after one checked step per entry of ``steps`` (the counts), fresh random K = V of ``k_shape``
    written to each of its ``num_layers`` layers."""
    rng = np.random.default_rng(seed)

    def step(c, n, k):
        c = c.begin(n)
        for layer in range(num_layers):
            c = c.write(layer, k, k)
        return c.commit()

    step = jax.jit(step)
    for counts in steps:
        k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
        cache = step(cache, jnp.asarray(counts, jnp.int32), k).check()
    return cache


def test_pooled_ring_refused_for_pages_keeps_its_ring():
    """A pooled (unbounded) ring whose step the pool refuses keeps the pages behind its window: a rollback of up to
    ``slack`` positions still succeeds after the refused step, as it does without it."""
    ring = Ring(4, 2, bounded=False)
    spec = CacheSpec(1, 1, 4, 32)
    cache = PagedKVCache.init(spec, 2, page_size=4, num_pages=4, ring=ring)
    cache = _stepped(cache, 1, ([2, 0], [2, 0], [2, 0], [2, 0], [0, 8]), (2, 1, 8, 4), seed=3)
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
    cache = _stepped(cache, 3, [[2, 2]] * 6 + [[0, 0]], (2, 1, 2, 8), seed=5)
    refused = jax.jit(lambda c: c.begin(jnp.asarray([9, 0], jnp.int32)).commit())(cache)
    _assert_untouched(cache, refused, E.ERR_POOL_EXHAUSTED, 0)
    back = jax.jit(lambda c: c.rollback(jnp.asarray([10, 12], jnp.int32)))(refused.clear_errors())
    np.testing.assert_array_equal(back.lengths, [10, 12])
    back.check()


@pytest.mark.parametrize("flat", [False, True], ids=["padded", "flat"])
@pytest.mark.parametrize("name", ["f32", "q8-paged", "ring-pooled", "plan-paged"])
def test_write_shorter_than_the_count_writes_nothing(name, flat):
    """A write of fewer tokens than the step's count (padded: that sequence's; flat: their sum) writes nothing of
    it (``ERR_BAD_COUNT``), not its first tokens."""
    begun = jax.jit(lambda c: c.begin(jnp.asarray([0, 3, 0], jnp.int32)))(lived_in(name))
    shape = (2, SPEC.num_kv_heads, SPEC.head_dim) if flat else (B, SPEC.num_kv_heads, 2, SPEC.head_dim)
    k = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
    after = jax.jit(lambda c, k: c.write(0, k, -k))(begun, k)
    errors = np.asarray(after.errors)
    assert np.all(errors == (E.ERR_BAD_COUNT if flat else [0, E.ERR_BAD_COUNT, 0])), errors
    assert bits(begun) == bits(after.clear_errors())
