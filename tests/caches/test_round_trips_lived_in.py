"""Round trips on every kind in a lived-in state (``lived_in``: shared pages, a pin, rings after wrap-around,
plans): ``snapshot`` / ``restore``, ``extract_slot`` then ``insert_into_slot`` into another slot, and ``fork``,
each compared bit for bit on every position the kind still holds (a ring: its window and slack), and a step after
the round trip writing the same as on the original."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lived_in import KINDS, SPEC, B, lived_in

from jkv.caches import KVCache, PagedKVCache, PlannedCache


def held(cache, name):
    """``{(layer, b): (k, v)}`` of the positions the kind holds, as stored, float64."""
    out = {}
    for layer in range(SPEC.num_layers):
        k, v = (np.asarray(x, np.float64) for x in cache.layer(layer, stored=True))
        for b in range(cache.batch):
            n = int(cache.lengths[b])
            lo = 0
            if name.startswith("ring"):
                lo = max(0, n - cache.ring.window - cache.ring.slack + 1)
            elif name.startswith("plan") and layer == 0:  # windows=(5, None), slack 3
                lo = max(0, n - 5 - 3 + 1)
            out[layer, b] = (k[b, :, lo:n], v[b, :, lo:n])
    return out


def assert_rows(got, want, rows):
    """Row ``b`` of ``got`` equals row ``rows[b]`` of ``want`` on every layer, bit for bit."""
    for (layer, b), (k, v) in got.items():
        wk, wv = want[layer, rows[b]]
        np.testing.assert_array_equal(k, wk, err_msg=f"{layer=} {b=}")
        np.testing.assert_array_equal(v, wv, err_msg=f"{layer=} {b=}")


def restore(snap, cache, name):
    if name.startswith("ring"):
        return PagedKVCache.restore(snap, page_size=4, ring=cache.ring, num_pages=cache.num_pages)
    if name.startswith("plan"):
        return PlannedCache.restore(snap, windows=(5, None), slack=3, layout=name.split("-")[1], page_size=4)
    if "paged" in name:
        return PagedKVCache.restore(snap, page_size=4, num_pages=12)
    return KVCache.restore(snap)


@jax.jit
def _step(cache, k):
    cache = cache.begin(jnp.asarray([2, 1, 2], jnp.int32))
    for layer in range(SPEC.num_layers):
        cache = cache.write(layer, k, -k)
    return cache.commit()


@pytest.mark.parametrize("name", KINDS)
def test_round_trips_keep_every_held_position(name):
    cache = lived_in(name)
    want = held(cache, name)
    same = (0, 1, 2)

    back = restore(cache.snapshot(), cache, name)
    np.testing.assert_array_equal(back.lengths, cache.lengths)
    assert_rows(held(back, name), want, same)

    moved = jax.jit(lambda c, s: c.insert_into_slot(jnp.int32(0), s))(cache, cache.extract_slot(1)).check()
    assert_rows(held(moved, name), want, (1, 1, 2))

    forked = jax.jit(lambda c: c.fork(jnp.int32(1), jnp.int32(2)))(cache).check()
    assert_rows(held(forked, name), want, (0, 1, 1))

    # A step after each: the same writes land alike, and the fork's source keeps its own positions.
    k = jnp.asarray(np.random.default_rng(1).standard_normal((B, SPEC.num_kv_heads, 2, SPEC.head_dim)), jnp.float32)
    after = held(_step(cache, k).check(), name)
    assert_rows(held(_step(back, k).check(), name), after, same)
    stepped = held(_step(forked, k).check(), name)
    assert_rows({key: x for key, x in stepped.items() if key[1] < 2}, after, same)
