"""PagedKVCache: every operation against the contiguous KVCache on the same data, sharing, errors, donation.

The contiguous ``KVCache`` (itself tested against NumPy in test_kinds.py) is the reference for logical contents:
the same steps and rollbacks on both caches must give equal valid positions. Random page placement
comes from a pool that earlier sequences fragmented, and from hand-built permuted block tables with NaN in
every page no table uses.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import _begin, _commit, _fork, _insert, _reset_slot, _rollback, _write
from conftest import REL_TOL, rel_err
from reference import attention_f64, decode_attention_f64

import jkv
from jkv.caches import ERR_BAD_SLOT, ERR_POOL_EXHAUSTED, ERR_WRITE_OVERFLOW, NO_PAGE, PagedKVCache

SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, max_len=32, dtype=jnp.float32)
PAGE = 8

# Operations run jitted (tests/cache_helpers.py: one compilation per cache type and shape), which also keeps
# this file fast on a 2-core CPU; the eager host-side path and its errors are tested in test_errors_eager.
_flat = jax.jit(lambda c: c.to_contiguous())
_extract = jax.jit(lambda c, slot, max_len: c.extract_slot(slot, max_len), static_argnums=(1, 2))


def rand_kv(rng, batch, t, spec=SPEC):
    shape = (batch, spec.num_kv_heads, t, spec.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), spec.dtype) for _ in range(2))


def valid(cache, b):
    """K and V of the valid positions of sequence ``b`` as NumPy ``[L, K, n, D]`` (paged or contiguous)."""
    flat = _flat(cache) if cache.layout == "paged" else cache
    n = int(cache.lengths[b])
    return np.asarray(flat.data[0])[:, b, :, :n], np.asarray(flat.data[1])[:, b, :, :n]  # host slices: no compile per n


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


# ---------------------------------------------------------------------- attention through the cache (XLA path)
def hand_built(rng, filled, lengths, *, page_size=PAGE, num_pages=16, spec=SPEC):
    """A cache whose sequence ``b`` has ``filled[b]`` positions on randomly permuted pages and length
    ``lengths[b]``; NaN in every page and row no sequence fills. Returns it and the contiguous K and V (float64)."""
    batch, max_pages = len(filled), spec.max_len // page_size
    shape = (spec.num_layers, num_pages, spec.num_kv_heads, page_size, spec.head_dim)
    k_pages, v_pages = np.full(shape, np.nan), np.full(shape, np.nan)
    full = (spec.num_layers, batch, spec.num_kv_heads, spec.max_len, spec.head_dim)
    k_ref, v_ref = rng.standard_normal(full), rng.standard_normal(full)
    pages = iter(rng.permutation(num_pages))
    tables = np.full((batch, max_pages), NO_PAGE, np.int32)
    for b, n in enumerate(filled):
        for j in range(-(-n // page_size)):
            tables[b, j] = page = next(pages)
            rows = np.arange(j * page_size, min((j + 1) * page_size, n))
            k_pages[:, page, :, : len(rows)] = k_ref[:, b, :, rows].transpose(1, 2, 0, 3)
            v_pages[:, page, :, : len(rows)] = v_ref[:, b, :, rows].transpose(1, 2, 0, 3)
    cache = PagedKVCache(
        (jnp.asarray(k_pages, spec.dtype), jnp.asarray(v_pages, spec.dtype)),
        jnp.asarray(tables),
        jnp.asarray(np.bincount(tables[tables >= 0], minlength=num_pages), jnp.int32),
        jnp.zeros(num_pages, jnp.int32),
        jnp.asarray(lengths, jnp.int32),
        jnp.zeros(batch, jnp.int32),
        jnp.zeros(batch, jnp.int32),
        spec=spec,
        format=jkv.Plain(spec.dtype),
    )
    return cache, k_ref, v_ref


@pytest.mark.parametrize("attended", [[1, 8, 9], [32, 17, 2], [16, 24, 31]], ids=str)
def test_decode_and_prefill_attention_match_float64(rng, attended):
    """jkv.attend at T = 1 and T = 2 over a PagedKVCache (XLA path) against NumPy float64."""
    attended = np.asarray(attended)
    # The step's one new key sits at lengths[b], already written: the query attends to lengths + 1 positions.
    cache, k_ref, v_ref = hand_built(rng, attended, attended - 1)
    cache = cache.replace(counts=jnp.ones(3, jnp.int32))
    q = rng.standard_normal((3, 1, 8, 8))  # N=8 over K=2: groups of 4
    out = jax.jit(lambda q, c: jkv.attend(q, c, 1, impl="xla"))(jnp.asarray(q, jnp.float32), cache)[:, 0]
    q = q[:, 0]
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, decode_attention_f64(q, k_ref[1], v_ref[1], attended)) < REL_TOL["float32"]

    t = 2  # prefill of the last T written tokens: query t sits at lengths + t
    cache = cache.replace(lengths=jnp.asarray(attended - t, jnp.int32), counts=jnp.full(3, t, jnp.int32))
    q = rng.standard_normal((3, t, 8, 8))
    out = jax.jit(lambda q, c: jkv.attend(q, c, 0))(jnp.asarray(q, jnp.float32), cache)
    positions = (attended - t)[:, None] + np.arange(t)[None, :]
    assert rel_err(out, attention_f64(q, k_ref[0], v_ref[0], positions)) < REL_TOL["float32"]


def test_model_protocol_decode_step_matches_contiguous(rng):
    """begin, write + attend per layer, commit: a paged and a contiguous cache give the same attention."""
    paged, ref = fragmented(rng)

    @jax.jit
    def step(cache, k, v, q):
        outs = []
        cache = cache.begin(1)
        for layer in range(SPEC.num_layers):
            cache = cache.write(layer, k, v)
            outs.append(jkv.attend(q, cache, layer, impl="xla"))
        return cache.commit(), jnp.stack(outs)

    for _ in range(10):
        k, v = rand_kv(rng, 4, 1)
        q = jnp.asarray(rng.standard_normal((4, 1, 4, 8)), jnp.float32)
        paged, got = step(paged, k, v, q)
        ref, want = step(ref, k, v, q)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert_same_contents(paged, ref)
    assert step._cache_size() == 2  # one compilation per cache type, whatever the lengths


# ---------------------------------------------------------------------- exhaustion, errors
def test_pool_exhaustion_flags_and_never_overwrites_a_live_page(rng):
    paged = PagedKVCache.init(SPEC, 3, page_size=PAGE, num_pages=5)
    single = _begin(jkv.KVCache.init(SPEC, 1), 12)
    for layer in range(SPEC.num_layers):
        single = _write(single, layer, *rand_kv(rng, 1, 12))
    single = _commit(single)
    paged = _insert(_insert(paged, 0, single), 1, single)  # 4 of 5 pages live
    before = _flat(paged)
    k, v = rand_kv(rng, 3, 9)
    out = jax.jit(lambda c, k, v: c.begin(9).write(0, k, v).write(1, k, v).commit())(paged, k, v)
    # Each sequence needs one more page, sequence 2 two; one is free: sequence 0 gets it, the rest nothing.
    np.testing.assert_array_equal(np.asarray(out.errors), [0, ERR_POOL_EXHAUSTED, ERR_POOL_EXHAUSTED])
    np.testing.assert_array_equal(np.asarray(out.lengths), [21, 12, 0])
    assert_same_contents(out.replace(lengths=paged.lengths), before)  # every live page as it was
    assert_allocator_consistent(out)
    assert int(out.num_free_pages()) == 0
    with pytest.raises(RuntimeError, match="sequence 1: page pool exhausted"):
        out.check()
    with pytest.raises(ValueError, match=r"page pool exhausted: reserving up to \[21 21  9\]"):
        paged.begin(9)
    long = _commit(_begin(_rollback(single, 0), 17))
    bad = _insert(paged, 2, long)
    np.testing.assert_array_equal(np.asarray(bad.errors), [0, 0, ERR_POOL_EXHAUSTED])
    assert int(bad.lengths[2]) == 0 and int(bad.pages_held()[2]) == 0
    with pytest.raises(ValueError, match="admitting a sequence of length 17 needs 3 pages of 8, only 1 of 5"):
        paged.insert_into_slot(2, long)


def test_errors_under_jit_flag_and_change_nothing(rng):
    paged, _ = step_both(rng, PagedKVCache.init(SPEC, 2, page_size=PAGE), jkv.KVCache.init(SPEC, 2), 30)
    k, v = rand_kv(rng, 2, 3)
    over = jax.jit(lambda c, k, v: c.begin(3).write(0, k, v))(paged, k, v)
    np.testing.assert_array_equal(np.asarray(over.errors), [ERR_WRITE_OVERFLOW] * 2)
    chex.assert_trees_all_equal(over.pages, paged.pages)
    for fn in (lambda c, i: c.fork(i, 0), lambda c, i: c.reset_slot(i)):
        bad = jax.jit(fn)(paged, 5)
        assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()
        chex.assert_trees_all_equal(bad.block_tables, paged.block_tables)
        chex.assert_trees_all_equal(bad.refcounts, paged.refcounts)
    same = jax.jit(lambda c: c.fork(1, 1))(paged)
    chex.assert_trees_all_equal(same, paged)


def test_errors_eager(rng):
    paged, _ = step_both(rng, PagedKVCache.init(SPEC, 2, page_size=PAGE), jkv.KVCache.init(SPEC, 2), 30)
    k3, v3 = rand_kv(rng, 2, 3)
    one = jkv.KVCache.init(SPEC, 1)
    flat = paged.to_contiguous()
    cases = [
        (lambda: PagedKVCache.init("spec", 1, page_size=8), TypeError, "jkv.CacheSpec"),
        (lambda: PagedKVCache.init(SPEC, 0, page_size=8), ValueError, "batch must be a positive int"),
        (lambda: PagedKVCache.init(SPEC, 1, page_size=0), ValueError, "page_size must be a positive int"),
        (lambda: PagedKVCache.init(SPEC, 1, page_size=5), ValueError, "spec.max_len=32 must be a multiple of"),
        (lambda: PagedKVCache.init(SPEC, 1, page_size=8, num_pages=0), ValueError, "num_pages must be a positive"),
        (lambda: paged.begin(3), ValueError, "must stay within [0, max_len=32]"),
        (lambda: paged.write(2, k3, v3), ValueError, "layer=2 out of range"),
        (lambda: paged.write(0, k3, v3[:, :, :2]), ValueError, "must match"),
        (lambda: paged.write(0, k3[:1], v3[:1]), ValueError, "does not match"),
        (lambda: paged.begin(-1), ValueError, "begin(counts=[-1 -1])"),
        (lambda: paged.rollback(31), ValueError, "rollback lengths=[31 31]"),
        (lambda: paged.begin(1.5), TypeError, "integer"),
        (lambda: paged.reset_slot(2), ValueError, "slot=2 out of range: expected an index in [0, 2)"),
        (lambda: paged.fork(0, 2), ValueError, "dst=2 out of range"),
        (lambda: paged.fork(-1, 0), ValueError, "src=-1 out of range"),
        (lambda: paged.insert_into_slot(0, "x"), TypeError, "single must be a jkv.KVCache"),
        (lambda: paged.insert_into_slot(0, jkv.KVCache.init(SPEC, 2)), ValueError, "one sequence, got batch=2"),
        (lambda: paged.insert_into_slot(0, jkv.KVCache.init(SPEC.replace(max_len=40), 1)), ValueError, "40"),
        (lambda: paged.insert_into_slot(0, jkv.KVCache.init(SPEC.replace(head_dim=4), 1)), ValueError, "head_dim"),
        (lambda: paged.insert_into_slot(3, one), ValueError, "slot=3"),
        (lambda: paged.layer(-1), ValueError, "layer=-1 out of range"),
        (lambda: paged.extract_slot(0, max_len=40), ValueError, "max_len=40 exceeds this cache's max_len=32"),
        (lambda: paged.extract_slot(0, max_len=0), ValueError, "max_len must be a positive int"),
        (lambda: paged.extract_slot(2), ValueError, "slot=2 out of range"),
        (lambda: PagedKVCache.from_contiguous(paged, page_size=8), TypeError, "cache must be a jkv.KVCache"),
        (lambda: PagedKVCache.restore("x", page_size=8), TypeError, "jkv.caches.Snapshot"),
        (lambda: PagedKVCache.from_contiguous(flat, page_size=8, num_pages=7), ValueError, "lengths=[30 30] need 8"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    np.testing.assert_array_equal(np.asarray(paged.lengths), [30, 30])  # nothing above changed the cache


# ---------------------------------------------------------------------- compiled once, updated in place
def test_donated_decode_step_runs_in_place(rng):
    """A jitted begin + write-every-layer + commit step aliases the donated pools and allocates no copy of them, also
    with the copy-on-write branch compiled in; fork, rollback, reset_slot and insert do the same."""
    spec = jkv.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, max_len=1024, dtype=jnp.float32)
    cache = PagedKVCache.init(spec, 8, page_size=16)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 1, 64)), jnp.float32)
    pools = sum(x.nbytes for x in cache.pages)

    def step(c, k):
        c = c.begin(1)
        for layer in range(spec.num_layers):
            c = c.write(layer, k, k)
        return c.commit()

    ops = [
        (step, (cache, k_new)),
        (lambda c: c.fork(0, 1).rollback(c.lengths).reset_slot(2), (cache,)),
        (lambda c, s: c.insert_into_slot(3, s), (cache, jkv.KVCache.init(spec.replace(max_len=128), 1))),
    ]
    for fn, args in ops:
        stats = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
        assert stats.alias_size_in_bytes >= pools, stats
        assert stats.temp_size_in_bytes < cache.pages[0].nbytes // 16, stats  # scratch, no copy of a pool
    plain = jax.jit(step).lower(cache, k_new).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0  # without donation: a fresh output (the checks above can fail)


def test_jitted_step_serves_every_position_without_recompiling(rng):
    cache = PagedKVCache.init(SPEC, 2, page_size=PAGE)
    step = jax.jit(lambda c, k: c.begin(1).write(0, k, k).commit(), donate_argnums=0)
    for _ in range(20):
        cache = step(cache, next(rand_kv(rng, 2, 1)))
    assert step._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(cache.pages_held()), [3, 3])
