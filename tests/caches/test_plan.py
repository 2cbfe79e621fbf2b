"""Per-layer cache plans (``jkv.caches.plan``): full layers beside windowed rings, against a float64 NumPy model
of every position ever written, with every buffer NaN-poisoned at the start (a ring read outside its window, or a
reused page read before it is written, shows up as NaN). Steps are ragged, rings wrap several times, rollbacks
cross the wrap; refusals leave everything untouched; slots, snapshots and the engine's prefix reuse keep the
contents; the memory of a Gemma-3-shaped plan is measured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_plan import MAX_LEN, PAGE, SLACK, SPEC, WINDOWS, B, Model, N, T, new_cache, run_rollback, run_step, step
from helpers_plan import wrapped as wrapped_plan

import jkv
from jkv import memory
from jkv.caches import ERR_WINDOW, PlannedCache
from jkv.serving import mixed

_begin = jax.jit(lambda c, n: c.begin(n))
# Slots and prefix reuse jitted, as the engine runs them (eagerly every operation compiles op by op).
_extract = jax.jit(lambda c, slot: c.extract_slot(slot))
_insert = jax.jit(lambda c, slot, single: c.insert_into_slot(slot, single))
_extract_copy = jax.jit(lambda c, slot: mixed.extract_copy(c, slot, max_len=MAX_LEN))
_restore_prefix = jax.jit(mixed.restore_prefix)
_pin_pages = jax.jit(mixed.pin_pages)
_attach_prefix = jax.jit(mixed.attach_prefix)


def flat_step(cache, model, rng, counts, rows=8):
    """A flat step (``jkv.caches.tokens``): sequence b's tokens are consecutive rows; rows past sum(counts) pad."""
    counts = np.asarray(counts)
    starts = np.cumsum(counts) - counts
    q = rng.standard_normal((rows, N, 16)).astype(np.float32)
    k = rng.standard_normal((SPEC.num_layers, rows, 2, 16)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    outs, cache = run_step(cache, jnp.asarray(counts, jnp.int32), q, k, v)
    padded_q = np.zeros((counts.shape[0], T, N, 16), np.float32)
    for b, (s, n) in enumerate(zip(starts, counts, strict=True)):
        padded_q[b, :n] = q[s : s + n]
        at = slice(model.lengths[b], model.lengths[b] + n)
        model.k[:, b, :, at] = k[:, s : s + n].transpose(0, 2, 1, 3)
        model.v[:, b, :, at] = v[:, s : s + n].transpose(0, 2, 1, 3)
    for layer in range(SPEC.num_layers):
        want = model.attend(padded_q, layer, counts)
        got = np.zeros_like(want)
        for b, (s, n) in enumerate(zip(starts, counts, strict=True)):
            got[b, :n] = outs[layer][s : s + n]
        assert rel_err(got, want) < 1e-5, layer
        assert not np.asarray(outs[layer][counts.sum() :]).any()  # padding rows: zero
    model.lengths += counts
    return cache


@pytest.fixture(scope="module", params=["contiguous", "paged"])
def wrapped(request):
    """A plan after 14 ragged steps with speculative-style rollbacks: every ring has wrapped."""
    return (request.param, *wrapped_plan(request.param))


def test_steps_match_the_model(wrapped):
    """The fixture checked every step; here: a step, the deepest rollback a ring guarantees below its end (across
    the wrap), two more padded steps and two flat ones."""
    _, cache, model = wrapped
    rng = np.random.default_rng(1)
    model = model.copy()
    cache = step(cache, model, rng, [SLACK, 3, SLACK])
    model.lengths -= SLACK
    cache = run_rollback(cache, jnp.asarray(model.lengths, jnp.int32))
    for counts in ([5, 1, 2], [1, 1, 1]):
        cache = step(cache, model, rng, counts)
    for counts in ([3, 0, 4], [1, 1, 1]):
        cache = flat_step(cache, model, rng, counts)
    assert np.asarray(cache.errors).max() == 0


def test_refusals_touch_nothing(wrapped):
    """A step beyond a contiguous plan's slack, and a rollback below what a ring holds: host calls raise; under
    jit the sequence is left as it was with ERR_WINDOW, the others go on."""
    layout, cache, model = wrapped
    with pytest.raises(ValueError, match="ring"):
        cache.rollback(jnp.asarray(model.lengths - 9, jnp.int32))
    deep = jnp.asarray(np.where(np.arange(B) == 1, model.lengths - 9, model.lengths - 1), jnp.int32)
    after = run_rollback(cache, deep)
    assert np.asarray(after.errors).tolist() == [0, ERR_WINDOW, 0]
    assert np.asarray(after.lengths).tolist() == (model.lengths - [1, 0, 1]).tolist()
    for old, new in zip(cache.groups[1:], after.groups[1:], strict=True):  # the refused sequence keeps its pages
        assert np.array_equal(old.block_tables[1], new.block_tables[1])
    assert run_rollback(cache, jnp.zeros(B, jnp.int32)).lengths.max() == 0  # back to empty: always
    if layout == "contiguous":
        with pytest.raises(ValueError, match="slack"):
            cache.begin(jnp.asarray([SLACK + 1, 1, 1], jnp.int32))
        begun = _begin(cache, jnp.asarray([SLACK + 1, 1, 1], jnp.int32))
        assert np.asarray(begun.counts).tolist() == [0, 1, 1]
        assert np.asarray(begun.errors).tolist() == [ERR_WINDOW, 0, 0]
        row = lambda c: [np.asarray(g.block_tables[0]) for g in c.groups[1:]]
        assert all(np.array_equal(a, b) for a, b in zip(row(begun), row(cache), strict=True))


def test_slots_snapshot_and_prefixes(wrapped):
    """extract -> insert into another slot, snapshot -> restore, and the engine's prefix reuse (contiguous: a
    device copy cut to n; paged: pinned pages attached) all attend as the model does."""
    layout, cache, model = wrapped
    rng = np.random.default_rng(2)
    single = _extract(cache, 0)
    assert single.spec.num_layers == 3 and int(single.lengths[0]) == model.lengths[0]
    moved = _insert(cache, 2, single)
    m2 = model.copy()
    m2.fork(0, 2)
    moved = step(moved, m2, rng, [1, 0, 2])

    snap = cache.snapshot()
    back = PlannedCache.restore(snap, windows=WINDOWS, slack=SLACK, layout=layout, page_size=PAGE)
    step(back, model.copy(), rng, [2, 1, 1])

    n = int(model.lengths[1]) - 2
    if layout == "contiguous":
        entry = _extract_copy(cache, 1)
        hit = _restore_prefix(cache, 0, entry, n)
    else:
        n -= n % PAGE
        cache, pages = _pin_pages(cache, 1, n)
        probe = jkv.KVCache.init(SPEC.replace(max_len=PAGE), 1)
        hit = _attach_prefix(cache, 0, pages, n, probe)
    m4 = model.copy()
    m4.fork(1, 0)
    m4.lengths[0] = n
    hit = step(hit, m4, rng, [3, 1, 0])
    assert np.asarray(hit.errors).max() == 0


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_pallas_kernels_read_rings(layout, rng):
    """The Pallas kernels (interpret mode) over wrapping rings: the paged multi-token kernel reads a ring through
    its block table from the window's first page; ragged steps of up to 5 tokens and decode steps."""
    cache, model = new_cache(layout, batch=2), Model(2)
    for counts in ([5, 4], [5, 5], [4, 5], [1, 3], [2, 1]):
        cache = step(cache, model, rng, counts, impl="pallas")
    assert (model.lengths > 6 - 1 + SLACK).all() and np.asarray(cache.errors).max() == 0


def test_gemma3_shaped_plan_memory():
    """5 local layers of window 1024 per global layer at 32k context: at most a quarter of full caches' bytes,
    measured on the arrays, and memory.plan_bytes says the same."""
    spec = jkv.CacheSpec(12, 1, 16, 32768)
    windows = tuple(None if i % 6 == 5 else 1024 for i in range(12))
    full = jkv.KVCache.init(spec, 1)
    for layout in ("contiguous", "paged"):
        plan = PlannedCache.init(spec, 1, windows=windows, slack=64, layout=layout)
        assert plan.nbytes <= 0.25 * full.nbytes, (layout, plan.nbytes / full.nbytes)
        assert memory.plan_bytes(spec, 1, windows, slack=64, layout=layout) == plan.nbytes
    assert memory.cache_bytes(spec, 1) == full.nbytes
