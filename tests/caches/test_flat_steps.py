"""Flat steps (``jkv.caches.tokens``): a flat ``[T, K, D]`` write stores each token where the padded
``[B, K, T, D]`` write of the same tokens does, for every kind; the layout of rows, padding rows and refused
sequences; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv.caches import ERR_WRITE_OVERFLOW, flat_layout, flat_starts

KINDS = jkv.kinds()
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=32, dtype=jnp.float32)


def make(kind, batch=3):
    return jkv.make_cache(kind, SPEC, batch, **({"page_size": 8} if jkv.caches.kind(kind).paged else {}))


def test_flat_layout_table():
    counts = jnp.asarray([2, 0, 3, 1], jnp.int32)
    lengths = jnp.asarray([5, 9, 0, 7], jnp.int32)
    slot, position, live = flat_layout(lengths, counts, 8)
    np.testing.assert_array_equal(flat_starts(counts), [0, 2, 2, 5])
    np.testing.assert_array_equal(live, [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.where(live, slot, -9), [0, 0, 2, 2, 2, 3, -9, -9])
    np.testing.assert_array_equal(position, [5, 6, 0, 1, 2, 7, -1, -1])


def flat_rows(rng, x, counts, t):
    """(L, t, K, D): sequence b's counts[b] tokens of the padded x (L, B, K, T, D) in order, then noise rows."""
    live = [x[:, b, :, :n].swapaxes(1, 2) for b, n in enumerate(counts)]
    noise = rng.standard_normal((x.shape[0], t - sum(counts), *x.shape[2:3], x.shape[-1])).astype(np.float32)
    return np.concatenate([*live, noise], axis=1)


@pytest.mark.parametrize("kind", KINDS)
def test_flat_write_equals_padded_write(rng, kind):
    """Two ragged steps (a zero count in each) written flat and padded store the same values (bit for bit)."""
    flat, padded = make(kind), make(kind)
    for counts in ([3, 0, 2], [1, 4, 0]):
        t = 8  # the flat bucket: two padding rows at least
        k = rng.standard_normal((2, 3, 2, 4, 64)).astype(np.float32)  # (L, B, K, T, D)
        v = rng.standard_normal((2, 3, 2, 4, 64)).astype(np.float32)
        kf, vf = (flat_rows(rng, x, counts, t) for x in (k, v))
        c = jnp.asarray(counts, jnp.int32)
        flat, padded = flat.begin(c), padded.begin(c)
        for layer in range(2):
            flat = flat.write(layer, jnp.asarray(kf[layer]), jnp.asarray(vf[layer]))
            padded = padded.write(layer, jnp.asarray(k[layer]), jnp.asarray(v[layer]))
        flat, padded = flat.commit(), padded.commit()
    np.testing.assert_array_equal(flat.lengths, padded.lengths)
    assert not np.asarray(flat.errors).any()
    for layer in range(2):
        for got, want in zip(flat.layer(layer, jnp.float32), padded.layer(layer, jnp.float32), strict=True):
            for b, n in enumerate(np.asarray(flat.lengths)):
                np.testing.assert_array_equal(got[b, :, :n], want[b, :, :n])


@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_flat_write_under_jit_refuses_overflow_and_touches_nothing(rng, kind):
    """A sequence past capacity gets count 0 and ERR_WRITE_OVERFLOW; the cache's layout then leaves it out, so the
    flat rows the caller lays out for the accepted counts land where they belong."""
    cache = make(kind).begin(jnp.asarray([30, 30, 30], jnp.int32))
    for layer in range(2):
        x = jnp.asarray(rng.standard_normal((3, 2, 30, 64)), jnp.float32)
        cache = cache.write(layer, x, x)
    cache = cache.commit()
    before = [np.asarray(x) for x in cache.layer(0, jnp.float32)]

    @jax.jit
    def step(cache, k):
        cache = cache.begin(jnp.asarray([1, 5, 2], jnp.int32))  # the middle one overflows (30 + 5 > 32)
        return cache.write(0, k, k).commit()

    k = jnp.asarray(rng.standard_normal((4, 2, 64)), jnp.float32)  # rows: seq 0, seq 2, seq 2, padding
    cache = step(cache, k)
    np.testing.assert_array_equal(cache.lengths, [31, 30, 32])
    np.testing.assert_array_equal(np.asarray(cache.errors) & ERR_WRITE_OVERFLOW, [0, ERR_WRITE_OVERFLOW, 0])
    got = [np.asarray(x) for x in cache.layer(0, jnp.float32)]
    np.testing.assert_array_equal(got[0][1], before[0][1][:, :], err_msg="the refused sequence was touched")
    np.testing.assert_array_equal(got[0][0, :, 30], np.asarray(k[0]))
    np.testing.assert_array_equal(got[0][2, :, 30:32], np.asarray(k[1:3]).swapaxes(0, 1))
    np.testing.assert_array_equal(got[0][:, :, :30], before[0][:, :, :30])


def test_flat_write_errors():
    cache = make("f32").begin(jnp.asarray([2, 2, 2], jnp.int32))
    x = jnp.ones((5, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="shorter than the step's counts"):
        cache.write(0, x, x)
    with pytest.raises(ValueError, match=r"flat step's \[T>=1, K=2, D=64\]"):
        cache.write(0, jnp.ones((6, 3, 64)), jnp.ones((6, 3, 64)))
