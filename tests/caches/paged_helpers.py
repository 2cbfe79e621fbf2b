"""Shared pieces of the paged cache tests (test_paged.py, test_paged_attention.py, test_paged_q8_cache.py): a
small spec, random K/V, the contiguous cache as the reference of logical contents, the allocator's invariants and a
fragmented pool."""

import jax
import jax.numpy as jnp
import numpy as np
from cache_helpers import _begin, _commit, _reset_slot, _rollback, _write

import jkv
from jkv.caches import PagedKVCache

SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, max_len=32, dtype=jnp.float32)
PAGE = 8

_flat = jax.jit(lambda c: c.to_contiguous())


def rand_kv(rng, batch, t, spec=SPEC):
    shape = (batch, spec.num_kv_heads, t, spec.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), spec.dtype) for _ in range(2))


def valid(cache, b):
    """The stored arrays (K and V; for Q8 their codes and scales) at the valid positions of sequence ``b`` as NumPy
    ``[L, K, n, X]``, paged or contiguous."""
    flat = _flat(cache) if cache.layout == "paged" else cache
    n = int(cache.lengths[b])
    return [np.asarray(x)[:, b, :, :n] for x in flat.data]  # host slices: no compile per n


def assert_same_contents(paged, ref):
    np.testing.assert_array_equal(np.asarray(paged.lengths), np.asarray(ref.lengths))
    for b in range(ref.batch):
        for got, want in zip(valid(paged, b), valid(ref, b), strict=True):
            np.testing.assert_array_equal(got, want)


def assert_allocator_consistent(cache):
    """Refcounts are the histogram of table entries plus pins; each sequence's entries cover its length, then stop."""
    tables = np.asarray(cache.block_tables)
    hist = np.bincount(tables[tables >= 0], minlength=cache.num_pages)
    np.testing.assert_array_equal(np.asarray(cache.refcounts), hist + np.asarray(cache.pins))
    assert (np.asarray(cache.pins) >= 0).all()
    for b, n in enumerate(np.asarray(cache.lengths)):
        held = int((tables[b] >= 0).sum())
        assert (tables[b, :held] >= 0).all() and held >= -(-n // cache.page_size), (b, tables[b], n)


def step_both(rng, paged, ref, t, advance=None):
    """A step of T tokens per sequence (or ``advance[b]``) on both caches: begin, every layer writes, commit. The
    writes are padded to 16 or 32 tokens (a sequence writes its first counts[b]): one compiled write per cache
    type, batch and bucket, whatever T."""
    n = np.full(ref.batch, t, np.int32) if advance is None else np.asarray(advance, np.int32)
    width = 16 if t <= 16 else SPEC.max_len
    paged, ref = _begin(paged, n), _begin(ref, n)
    for layer in range(SPEC.num_layers):
        k, v = rand_kv(rng, ref.batch, width)
        paged, ref = _write(paged, layer, k, v), _write(ref, layer, k, v)
    paged, ref = _commit(paged), _commit(ref)
    assert not np.asarray(paged.errors).any() and not np.asarray(ref.errors).any()
    return paged, ref


def fragmented(rng):
    """Four sequences on 16 pages, some retired and rolled back so that live and free pages interleave.

    Returns the paged cache and a contiguous cache holding the same logical contents.
    """
    paged, ref = PagedKVCache.init(SPEC, 4, page_size=PAGE, num_pages=16), jkv.KVCache.init(SPEC, 4)
    paged, ref = step_both(rng, paged, ref, 5)
    paged, ref = step_both(rng, paged, ref, 8)
    paged, ref = _reset_slot(_reset_slot(paged, 1), 2), _reset_slot(_reset_slot(ref, 1), 2)
    paged, ref = step_both(rng, paged, ref, 9)
    paged, ref = _rollback(paged, jnp.array([20, 3, 9, 4])), _rollback(ref, jnp.array([20, 3, 9, 4]))
    tables = np.asarray(paged.block_tables)
    assert not (np.diff(tables[tables >= 0]) == 1).all(), tables  # not simply pages 0, 1, 2, ... in order
    return paged, ref


def assert_donated_ops_in_place(cache, single, k_new):
    """A jitted begin + write-every-layer + commit step (``k_new`` as K and V), fork/rollback/reset_slot and the
    insert of ``single`` into slot 3 alias the donated pools of ``cache`` and allocate no copy of them. Returns the
    step (for a check without donation)."""
    pools = sum(x.nbytes for x in cache.pages)

    def step(c, k):
        c = c.begin(1)
        for layer in range(c.spec.num_layers):
            c = c.write(layer, k, k)
        return c.commit()

    ops = [
        (step, (cache, k_new)),
        (lambda c: c.fork(0, 1).rollback(c.lengths).reset_slot(2), (cache,)),
        (lambda c, s: c.insert_into_slot(3, s), (cache, single)),
    ]
    for fn, args in ops:
        stats = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
        assert stats.alias_size_in_bytes >= pools, stats
        assert stats.temp_size_in_bytes < cache.pages[0].nbytes // 16, stats  # scratch, no copy of a pool
    return step
