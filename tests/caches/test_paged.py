"""PagedKVCache: every operation against the contiguous KVCache on the same data, and page sharing (attention
through the cache, errors and donation: test_paged_attention.py).

The contiguous ``KVCache`` (itself tested against NumPy in test_kinds.py) is the reference for logical contents:
the same steps and rollbacks on both caches must give equal valid positions. Random page placement
comes from a pool that earlier sequences fragmented.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import _begin, _commit, _fork, _insert, _reset_slot, _rollback, _write
from paged_helpers import (
    PAGE,
    SPEC,
    assert_allocator_consistent,
    assert_same_contents,
    fragmented,
    rand_kv,
    step_both,
    valid,
)

import jkv
from jkv.caches import ERR_BAD_SLOT, NO_PAGE, PagedKVCache

# Operations run jitted (tests/cache_helpers.py: one compilation per cache type and shape), which also keeps
# this file fast on a 2-core CPU; the eager host-side path and its errors are tested in
# test_paged_attention.py's test_errors_eager.
_extract = jax.jit(lambda c, slot, max_len: c.extract_slot(slot, max_len), static_argnums=(1, 2))


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("page_size", [4, 8, 32])
def test_init_shapes_and_nbytes(dtype, page_size):
    spec = SPEC.replace(dtype=jnp.dtype(dtype))
    cache = PagedKVCache.init(spec, 3, page_size=page_size, num_pages=5)
    chex.assert_shape(list(cache.pages), (2, 5, 2, page_size, 8))
    chex.assert_shape(cache.block_tables, (3, 32 // page_size))
    assert cache.pages[0].dtype == jnp.dtype(dtype) and cache.block_tables.dtype == jnp.int32
    assert (cache.page_size, cache.num_pages, cache.max_pages, cache.max_len, cache.batch) == (
        page_size, 5, 32 // page_size, 32, 3
    )  # fmt: skip
    assert cache.spec == spec
    assert (np.asarray(cache.block_tables) == NO_PAGE).all() and int(cache.num_free_pages()) == 5
    pool = 2 * 2 * 5 * 2 * page_size * 8 * jnp.dtype(dtype).itemsize
    # tables, refcounts, pins, lengths, counts, errors
    assert cache.nbytes == pool + 4 * (3 * (32 // page_size) + 5 + 5 + 3 + 3 + 3)
    assert PagedKVCache.init(spec, 3, page_size=page_size).num_pages == 3 * (32 // page_size)  # default: all full


# ---------------------------------------------------------------------- operations against the contiguous cache
@pytest.mark.parametrize("steps", [(1, 1), (5, 9, 9), (8, 8, 13)], ids=str)
def test_writes_across_page_boundaries_match_contiguous(rng, steps):
    paged = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=12)
    ref = jkv.KVCache.init(SPEC, 3)
    for t in steps:
        paged, ref = step_both(rng, paged, ref, t)
        assert_same_contents(paged, ref)
        assert_allocator_consistent(paged)
    n = sum(steps)
    assert int(paged.pages_held().sum()) == 3 * -(-n // PAGE)  # exactly the pages the lengths cover


def test_ragged_advance_rollback_reset_slot_on_a_fragmented_pool(rng):
    paged, ref = fragmented(rng)
    assert_same_contents(paged, ref)
    assert_allocator_consistent(paged)
    paged, ref = step_both(rng, paged, ref, 5, advance=[5, 0, 3, 1])
    paged, ref = step_both(rng, paged, ref, 5)
    assert_same_contents(paged, ref)
    tables = np.asarray(paged.block_tables)
    assert len(set(tables[tables >= 0].tolist())) == int((tables >= 0).sum())  # no page named twice
    new = jnp.array([9, 2, 14, 0])
    paged, ref = _rollback(paged, new), _rollback(ref, new)
    assert_same_contents(paged, ref)
    assert_allocator_consistent(paged)
    np.testing.assert_array_equal(np.asarray(paged.pages_held()), [2, 1, 2, 0])  # pages past each length went back
    paged, ref = _reset_slot(paged, 0), _reset_slot(ref, 0)
    np.testing.assert_array_equal(np.asarray(paged.pages_held()), [0, 1, 2, 0])
    paged, ref = step_both(rng, paged, ref, 5)
    assert_same_contents(paged, ref)
    assert_allocator_consistent(paged)
    empty = paged.reset()
    assert int(empty.num_free_pages()) == paged.num_pages and not np.asarray(empty.lengths).any()


def test_begin_reserves_once_and_rollback_gives_back(rng):
    """``begin`` reserves the step's pages (every layer's write then only scatters); a second ``begin`` of the
    same step allocates nothing; ``rollback`` gives back pages of a step that never committed."""
    paged = PagedKVCache.init(SPEC, 2, page_size=PAGE, num_pages=8)
    k, v = rand_kv(rng, 2, 9)
    once = _begin(paged, jnp.full(2, 9, jnp.int32))
    np.testing.assert_array_equal(np.asarray(once.pages_held()), [2, 2])  # reserved, lengths still 0
    twice = _write(_write(_begin(once, jnp.full(2, 9, jnp.int32)), 1, k, v), 0, k, v)
    chex.assert_trees_all_equal(twice.block_tables, once.block_tables)  # reserving again allocates nothing
    chex.assert_trees_all_equal(twice.refcounts, once.refcounts)
    back = _rollback(once, jnp.zeros(2, jnp.int32))
    assert int(back.num_free_pages()) == 8  # rollback gives back pages a step reserved but never committed


def test_fork_shares_pages_then_copies_on_write(rng):
    paged, ref = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=12), jkv.KVCache.init(SPEC, 3)
    paged, ref = step_both(rng, paged, ref, 13, advance=[13, 0, 0])  # sequence 0: one full page, one partial
    forked = _fork(paged, 0, 2)
    tables = np.asarray(forked.block_tables)
    np.testing.assert_array_equal(tables[2], tables[0])  # the same physical pages
    np.testing.assert_array_equal(np.asarray(forked.refcounts)[tables[0, :2]], [2, 2])
    assert int(forked.num_free_pages()) == int(paged.num_free_pages())  # shared, not copied
    ref = _insert(ref, 2, ref.extract_slot(0))
    assert_same_contents(forked, ref)

    # Sequence 2 rolls back into the shared full page, then writes there alone: it copies that page, and the
    # original, still sequence 0's, keeps its contents (sequence 0 writes into its own partial page meanwhile).
    alone, ref2 = _rollback(forked, jnp.array([13, 0, 5])), _rollback(ref, jnp.array([13, 0, 5]))
    np.testing.assert_array_equal(np.asarray(alone.refcounts)[tables[0, :2]], [2, 1])
    alone, ref2 = step_both(rng, alone, ref2, 1)
    assert_same_contents(alone, ref2)
    after = np.asarray(alone.block_tables)
    assert after[0, 0] == tables[0, 0] and after[2, 0] not in tables[0], (after, tables)
    np.testing.assert_array_equal(np.asarray(alone.refcounts)[[tables[0, 0], after[2, 0]]], [1, 1])
    assert_allocator_consistent(alone)

    # Both write into the shared partial page in one step: the first keeps it, sequence 2 copies it.
    grown, ref = step_both(rng, forked, ref, 1, advance=[0, 0, 1])
    assert_same_contents(grown, ref)
    after = np.asarray(grown.block_tables)
    assert after[2, 0] == tables[0, 0] and after[2, 1] != tables[0, 1] and after[0, 1] == tables[0, 1]
    np.testing.assert_array_equal(np.asarray(grown.refcounts)[[tables[0, 0], tables[0, 1], after[2, 1]]], [2, 1, 1])
    assert_allocator_consistent(grown)


def test_a_write_outside_a_step_touches_nothing(rng):
    """Without ``begin`` the counts are 0: a write (even after a fork, on shared pages) stores nothing."""
    paged, ref = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=12), jkv.KVCache.init(SPEC, 3)
    paged, ref = step_both(rng, paged, ref, 13, advance=[13, 0, 0])
    forked = _fork(paged, 0, 2)
    k, v = rand_kv(rng, 3, 1)
    out = _commit(_write(forked, 0, k, v))
    chex.assert_trees_all_equal(out, forked)


_pin = jax.jit(lambda c, i, n: c.pin(i, n))
_unpin = jax.jit(lambda c, pages: c.unpin(pages))
_insert_shared = jax.jit(lambda c, i, single, pages, n: c.insert_into_slot(i, single, prefix=(pages, n)))
_read_pinned = jax.jit(lambda c, pages, n: c.read_pinned(pages, n))


def test_pinned_prefix_outlives_its_sequence_and_is_shared_by_later_ones(rng):
    """A prefix cache's path: pin a prompt's pages, retire its sequence, continue a new prompt from the pinned
    pages (read_pinned), admit it sharing them (its partial page copied on its first write), unpin."""
    paged, ref = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=12), jkv.KVCache.init(SPEC, 3)
    paged, ref = step_both(rng, paged, ref, 13, advance=[13, 0, 0])  # sequence 0: one full page, one partial
    k0, _ = valid(ref, 0)
    paged, pages = _pin(paged, 0, 13)
    row = np.asarray(paged.block_tables)[0]
    np.testing.assert_array_equal(np.asarray(pages), [row[0], row[1], NO_PAGE, NO_PAGE])
    paged, ref = _reset_slot(paged, 0), _reset_slot(ref, 0)
    np.testing.assert_array_equal(np.asarray(paged.refcounts)[row[:2]], [1, 1])  # held by the pins alone
    assert int(paged.num_free_pages()) == 12 - 2 - int(paged.pages_held().sum())
    assert_allocator_consistent(paged)

    # A new prompt shares the first 10 positions: continue from the pinned pages, "prefill" 6 more.
    first_two = np.asarray(pages)[:2]  # sliced on the host: no compile
    read = _read_pinned(paged, first_two, 10)
    assert read.max_len == 2 * PAGE and int(read.lengths[0]) == 10
    np.testing.assert_array_equal(np.asarray(read.data[0])[:, 0, :, :10], k0[:, :, :10])
    single = _insert(jkv.KVCache.init(SPEC, 1), 0, read)
    single, _ = step_both(rng, single, single, 6)
    admitted = _insert_shared(paged, 1, single, pages, 10)
    ref = _insert(ref, 1, single)
    assert_same_contents(admitted, ref)
    after = np.asarray(admitted.block_tables)[1]
    assert after[0] == row[0] and after[1] not in row[:2] and after[1] >= 0  # full page shared, partial one copied
    np.testing.assert_array_equal(np.asarray(admitted.refcounts)[[row[0], row[1], after[1]]], [2, 1, 1])
    assert_allocator_consistent(admitted)
    # The pinned pages kept their contents (sequence 1 wrote positions 10..15 into its copy).
    np.testing.assert_array_equal(np.asarray(_read_pinned(admitted, first_two, 13).data[0])[:, 0, :, :13], k0)

    # Unpinning frees the page no table names; the shared one stays with sequence 1.
    freed = _unpin(admitted, pages)
    np.testing.assert_array_equal(np.asarray(freed.refcounts)[[row[0], row[1]]], [1, 0])
    assert_allocator_consistent(freed)
    assert_same_contents(freed, ref)


def test_pin_and_shared_insert_errors(rng):
    paged, ref = PagedKVCache.init(SPEC, 2, page_size=PAGE, num_pages=8), jkv.KVCache.init(SPEC, 2)
    paged, ref = step_both(rng, paged, ref, 9, advance=[9, 0])
    with pytest.raises(ValueError, match=r"pin length=10 must lie in \[0, lengths\[0\]=9\]"):
        paged.pin(0, 10)
    with pytest.raises(ValueError, match="unpin of pages"):
        paged.unpin(paged.block_tables[0])
    pinned, pages = _pin(paged, 0, 9)
    single = _extract(ref, 0, None)
    with pytest.raises(ValueError, match="must be covered by pinned pages"):
        pinned.insert_into_slot(1, single, prefix=(paged.block_tables[1], 4))  # no pages there
    with pytest.raises(ValueError, match="must be covered by pinned pages"):
        pinned.insert_into_slot(1, single, prefix=(pages, 17))  # past the pinned pages
    # Under jit: the slot ends empty, flagged; nothing else changes.
    bad = _insert_shared(pinned, 1, single, jnp.full(4, NO_PAGE, jnp.int32), 4)
    assert int(bad.lengths[1]) == 0 and int(bad.errors[1]) == ERR_BAD_SLOT and int(bad.pages_held()[1]) == 0
    chex.assert_trees_all_equal(bad.pins, pinned.pins)
    chex.assert_trees_all_equal(bad.block_tables[0], pinned.block_tables[0])
    assert_allocator_consistent(bad)
    flagged, none = _pin(pinned, 1, 3)  # length past sequence 1's 0
    assert (np.asarray(none) == NO_PAGE).all() and int(flagged.errors[1]) == ERR_BAD_SLOT
    chex.assert_trees_all_equal(flagged.pins, pinned.pins)


def test_read_pinned_and_unpin_refuse_pages_that_are_not_pinned(rng):
    """A page id outside the pool or not pinned is refused on the host, never read in another page's place (it
    was clamped to the pool's last page); under jit it reads 0 and the result is flagged. Unpinning a page id
    outside the pool is refused on the host as an unpinned one is."""
    paged, ref = PagedKVCache.init(SPEC, 2, page_size=PAGE, num_pages=3), jkv.KVCache.init(SPEC, 2)
    paged, ref = step_both(rng, paged, ref, 2 * PAGE, advance=[PAGE, 2 * PAGE])  # sequence 1 holds the last page
    pinned, pages = _pin(paged, 0, PAGE)
    last = int(pinned.block_tables[1, 1])
    assert last == pinned.num_pages - 1
    for bad, what in (([99], r"pages \[99\] outside the pool \[0, 3\)"), ([last], rf"pages \[{last}\] .*not pinned")):
        with pytest.raises(ValueError, match=what):
            pinned.read_pinned(np.asarray(bad), 4)
        read = _read_pinned(pinned, np.asarray(bad), 4)
        assert int(read.errors[0]) == ERR_BAD_SLOT and not np.asarray(read.data[0]).any()
    with pytest.raises(ValueError, match=r"length=9 must lie in \[0, 8\]"):
        pinned.read_pinned(pages[:1], PAGE + 1)
    assert int(_read_pinned(pinned, pages[:1], PAGE + 1).errors[0]) == ERR_BAD_SLOT
    assert int(_read_pinned(pinned, pages[:1], PAGE).errors[0]) == 0
    with pytest.raises(ValueError, match=r"unpin of pages \[99\] outside the pool \[0, 3\)"):
        pinned.unpin(np.asarray([int(pages[0]), 99]))


def test_sharers_writing_together_copy_one_page_less(rng):
    """Forked samples decoding in one step: the first sharer keeps the shared page, the others copy it."""
    paged, ref = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=12), jkv.KVCache.init(SPEC, 3)
    paged, ref = step_both(rng, paged, ref, 5, advance=[5, 0, 0])
    paged, ref = _fork(_fork(paged, 0, 1), 0, 2), _insert(ref, 1, ref.extract_slot(0))
    ref = _insert(ref, 2, ref.extract_slot(0))
    shared = int(paged.block_tables[0, 0])
    assert int(paged.refcounts[shared]) == 3
    paged, ref = step_both(rng, paged, ref, 1)
    assert_same_contents(paged, ref)
    tables = np.asarray(paged.block_tables)[:, 0]
    assert tables[0] == shared and len(set(tables.tolist())) == 3  # two copies, not three
    assert int(paged.num_free_pages()) == 12 - 3


def test_insert_into_slot_snapshot_restore(rng):
    paged, ref = fragmented(rng)
    single = _begin(jkv.KVCache.init(SPEC.replace(max_len=20), 1), 17)
    k, v = rand_kv(rng, 1, 17)
    for layer in range(SPEC.num_layers):
        single = _write(single, layer, k, v)
    single = _commit(single)
    paged, ref = _insert(paged, 1, single), _insert(ref, 1, single)
    assert_same_contents(paged, ref)
    np.testing.assert_array_equal(np.asarray(paged.pages_held()), [3, 3, 2, 1])
    again = _insert(paged, 1, _rollback(single, 3))  # replacing a slot gives its old pages back
    np.testing.assert_array_equal(np.asarray(again.pages_held()), [3, 1, 2, 1])
    assert_allocator_consistent(again)

    for slot, max_len in ((1, None), (2, 12), (3, 32)):
        got, want = _extract(paged, slot, max_len), _extract(ref, slot, max_len)
        assert got.data[0].shape == want.data[0].shape and int(got.lengths[0]) == int(want.lengths[0])
        assert_same_contents(got, want)

    snap = paged.snapshot()
    assert snap.data[0].shape[3] == 20 and snap.max_len == 32
    restored = PagedKVCache.restore(snap, page_size=4, num_pages=20)
    assert (restored.page_size, restored.num_pages) == (4, 20)
    assert_same_contents(restored, ref)
    flat = jkv.KVCache.restore(snap)
    assert_same_contents(PagedKVCache.from_contiguous(flat, page_size=16), flat)
