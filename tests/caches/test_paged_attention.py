"""PagedKVCache: attention through the cache against float64, the model protocol's decode step against the
contiguous cache, pool exhaustion, errors (under jit and eager), donation and one compiled step for every position.
Hand-built permuted block tables put NaN in every page no table uses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import _begin, _commit, _insert, _rollback, _write
from conftest import REL_TOL, rel_err
from paged_helpers import (
    PAGE,
    SPEC,
    _flat,
    assert_allocator_consistent,
    assert_donated_ops_in_place,
    assert_same_contents,
    fragmented,
    rand_kv,
    step_both,
)
from reference import attention_f64, decode_attention_f64

import jkv
from jkv.caches import ERR_BAD_SLOT, ERR_POOL_EXHAUSTED, ERR_WRITE_OVERFLOW, NO_PAGE, PagedKVCache


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
    step = assert_donated_ops_in_place(cache, jkv.KVCache.init(spec.replace(max_len=128), 1), k_new)
    plain = jax.jit(step).lower(cache, k_new).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0  # without donation: a fresh output (the checks above can fail)


def test_jitted_step_serves_every_position_without_recompiling(rng):
    cache = PagedKVCache.init(SPEC, 2, page_size=PAGE)
    step = jax.jit(lambda c, k: c.begin(1).write(0, k, k).commit(), donate_argnums=0)
    for _ in range(20):
        cache = step(cache, next(rand_kv(rng, 2, 1)))
    assert step._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(cache.pages_held()), [3, 3])
