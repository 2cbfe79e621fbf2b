"""Per-layer cache plans (``jkv.caches.plan``): the uniform kinds' operations beyond the step — fork, with_format,
read_pinned, restore into a longer plan — on plans whose rings have wrapped (tests/helpers_plan.py), against the
float64 model of every position written and against the same operation of a uniform cache; and what a plan
refuses, with why."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import bound
from conftest import rel_err
from helpers_plan import MAX_LEN, PAGE, SLACK, SPEC, WINDOWS, B, Model, new_cache, rollback, run_step, step, step_inputs
from helpers_plan import wrapped as wrapped_plan

import jkv
from jkv.caches import ERR_BAD_SLOT, ERR_POOL_EXHAUSTED, PlannedCache

_fork = jax.jit(lambda c, src, dst: c.fork(src, dst))
_with_format = jax.jit(lambda c, fmt: c.with_format(fmt), static_argnums=1)
_flat = jax.jit(lambda c: c.to_contiguous())
_pin = jax.jit(lambda c, slot, n: c.pin(slot, n))
_read_pinned = jax.jit(lambda c, pages, n: c.read_pinned(pages, n))
_extract = jax.jit(lambda c, slot: c.extract_slot(slot))


@jax.jit  # one program, not each layer's decoding op by op
def _decoded(cache):
    """Every layer's K and V decoded, ``[L, B, K, S, D]`` each."""
    layers = [cache.layer(i) for i in range(cache.spec.num_layers)]
    return jnp.stack([k for k, _ in layers]), jnp.stack([v for _, v in layers])


@pytest.fixture(scope="module", params=["contiguous", "paged"])
def wrapped(request):
    return (request.param, *wrapped_plan(request.param))


def pools(cache):
    return [g for g in cache.groups if isinstance(g, jkv.PagedKVCache)]


def held(layer, length):
    """Positions of ``layer`` a sequence of ``length`` surely holds: all of them, or a ring's last ``window``."""
    window = WINDOWS[layer]
    return slice(0 if window is None else max(0, length - window + 1), length)


def test_fork_shares_then_diverges(wrapped):
    """fork(0 -> 2) with traced slots after the rings wrapped: every paged group (rings, a paged plan's full
    layers) shares src's pages and takes none; then src and dst take different tokens, dst rolls back into the
    shared pages and both go on: every output as the model's (dst started as a copy of src), and each slot stores
    its own tokens, never the other's."""
    _, cache, model = wrapped
    rng, model = np.random.default_rng(3), model.copy()
    forked = _fork(cache, jnp.int32(0), jnp.int32(2))
    model.fork(0, 2)
    assert np.asarray(forked.lengths).tolist() == model.lengths.tolist() and not np.asarray(forked.errors).any()
    for before, after in zip(pools(cache), pools(forked), strict=True):
        np.testing.assert_array_equal(after.block_tables[2], after.block_tables[0])
        assert int(after.num_free_pages()) >= int(before.num_free_pages())  # dst's pages back, none taken
    forked = step(forked, model, rng, [2, 1, 3])
    forked = rollback(forked, model, model.lengths - [0, 0, SLACK])  # the deepest a ring guarantees: shared pages
    for counts in ([1, 2, 4], [3, 0, 1]):
        forked = step(forked, model, rng, counts)
    for slot in (0, 2):  # each holds what was written to it, never the other's tokens
        one = _extract(forked, slot)
        for layer in range(SPEC.num_layers):
            at = held(layer, int(model.lengths[slot]))
            np.testing.assert_array_equal(one.data[0][layer, 0, :, at], model.k[layer, slot, :, at])
            np.testing.assert_array_equal(one.data[1][layer, 0, :, at], model.v[layer, slot, :, at])
    assert not np.asarray(forked.errors).any()


def test_fork_refusals(wrapped):
    """src == dst changes nothing; a slot out of range under jit flags ERR_BAD_SLOT in every sequence and touches
    nothing; host calls raise naming the slot."""
    _, cache, _ = wrapped
    # Groups keep the lengths of their last operation (the plan's own are the truth): compare them synced.
    synced = lambda c: c.replace(groups=tuple(g.replace(lengths=c.lengths, counts=c.counts) for g in c.groups))
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, synced(a), synced(b))
    same(_fork(cache, jnp.int32(1), jnp.int32(1)), cache)
    bad = _fork(cache, jnp.int32(B), jnp.int32(0))
    assert np.asarray(bad.errors).tolist() == [ERR_BAD_SLOT] * B
    same(bad.replace(errors=cache.errors), cache)
    for src, dst, name in ((0, B, f"dst={B}"), (-1, 0, "src=-1")):
        with pytest.raises(ValueError, match=name):
            cache.fork(src, dst)


def test_with_format_fp8(wrapped):
    """with_format(FP8) of a wrapped plan stores what the uniform cache's with_format stores (bit for bit), within
    FP8's bound of the model; back to Plain is exact; a step then attends as the same step on the uncapped uniform
    cache of the same contents."""
    _, cache, model = wrapped
    fp8 = _with_format(cache, jkv.FP8())
    assert fp8.format == jkv.FP8() and all(g.format == jkv.FP8() for g in fp8.groups)
    uniform = _flat(cache).with_format(jkv.FP8())
    got = _flat(fp8)
    back = _with_format(fp8, jkv.Plain())
    assert back.format == jkv.Plain(jnp.float32)
    (ks, vs), (kbs, vbs) = _decoded(got), _decoded(back)
    for layer in range(SPEC.num_layers):
        k, v, kb, vb = ks[layer], vs[layer], kbs[layer], vbs[layer]
        for b in range(B):
            at = held(layer, int(model.lengths[b]))
            for x, want in ((k, model.k), (v, model.v)):
                x, want = np.asarray(x[b, :, at]), want[layer, b, :, at]
                assert (np.abs(x - want) <= bound("fp8", want)).all(), (layer, b)
            np.testing.assert_array_equal(kb[b, :, at], k[b, :, at])
            np.testing.assert_array_equal(vb[b, :, at], v[b, :, at])
            for x, y in zip(got.data, uniform.data, strict=True):
                np.testing.assert_array_equal(x[layer, b, :, at], y[layer, b, :, at])
    q, k, v = step_inputs(np.random.default_rng(4), B)
    counts = jnp.asarray([3, 0, 5], jnp.int32)
    outs, stepped = run_step(fp8, counts, q, k, v)
    want, _ = run_step(uniform, counts, q, k, v)
    assert rel_err(outs, want) < 1e-5 and not np.asarray(stepped.errors).any()


def test_with_format_q8_and_restore():
    """A paged plan of random contents quantized to Q8 (head_dim 32) stores what the uniform cache's
    with_format(Q8) stores, within Q8's bound; its snapshot restores bit for bit into a plan twice as long."""
    rng = np.random.default_rng(5)
    spec, windows, lengths = jkv.CacheSpec(2, 1, 32, 32), (None, 4), [11, 30]
    flat = jkv.KVCache.init(spec, 2).replace(lengths=jnp.asarray(lengths, jnp.int32))
    flat = flat.replace(data=tuple(jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in flat.data))
    options = dict(windows=windows, slack=2, layout="paged", page_size=PAGE)
    q8 = _with_format(PlannedCache.from_contiguous(flat, **options), jkv.Q8())
    uniform, got = flat.with_format(jkv.Q8()), _flat(q8)
    restored = _flat(PlannedCache.restore(q8.snapshot(), max_len=2 * spec.max_len, **options))
    assert restored.max_len == 2 * spec.max_len and restored.format == jkv.Q8()
    ks, vs = _decoded(got)
    for layer, window in enumerate(windows):
        k, v = ks[layer], vs[layer]
        for b, n in enumerate(lengths):
            at = slice(0 if window is None else n - window + 1, n)
            for x, y, z in zip(got.data, uniform.data, restored.data, strict=True):
                np.testing.assert_array_equal(x[layer, b, :, at], y[layer, b, :, at])
                np.testing.assert_array_equal(x[layer, b, :, at], z[layer, b, :, at])
            for x, want in ((k, flat.data[0]), (v, flat.data[1])):
                want = np.asarray(want[layer, b, :, at], np.float64)
                assert (np.abs(np.asarray(x[b, :, at]) - want) <= bound("q8", want)).all(), (layer, b)


def test_read_pinned_and_unpin():
    """A paged plan's pinned prefix read back: positions [0, n) as extract_slot has them (a ring's let-go pages
    read 0) and as the model wrote them; unpin gives every pinned page back."""
    cache, model = wrapped_plan("paged")
    n = int(model.lengths[1]) - 3
    pinned, pages = _pin(cache, 1, n)
    assert len(pages) == len(cache.groups)
    read, one = _read_pinned(pinned, pages, n), _extract(cache, 1)
    assert read.max_len == MAX_LEN and int(read.lengths[0]) == n
    for x, y in zip(read.data, one.data, strict=True):
        np.testing.assert_array_equal(x[:, :, :, :n], y[:, :, :, :n])
    ks, _ = _decoded(read)
    for layer in range(SPEC.num_layers):
        np.testing.assert_array_equal(ks[layer, 0, :, held(layer, n)], model.k[layer, 1, :, held(layer, n)])
    back = pinned.unpin(pages)
    for group, before in zip(back.groups, cache.groups, strict=True):
        assert not np.asarray(group.pins).any()
        np.testing.assert_array_equal(group.refcounts, before.refcounts)


def test_refusals_say_why():
    """What a plan cannot do, refused on the host with the reason: prefix pages on a contiguous plan (it shares
    no pages), page vectors not one per group, a format the spec cannot hold; and a pool's attributes, which a
    plan has one of per group (an AttributeError: getattr with a default still works)."""
    contiguous, paged = new_cache("contiguous"), new_cache("paged")
    single = jkv.KVCache.init(SPEC, 1)
    for call in (
        lambda: contiguous.pin(0, 0),
        lambda: contiguous.unpin(()),
        lambda: contiguous.read_pinned((), 0),
        lambda: contiguous.insert_into_slot(0, single, prefix=((), 0)),
    ):
        with pytest.raises(TypeError, match="needs a paged plan"):
            call()
    no_page = jnp.full((MAX_LEN // PAGE,), -1, jnp.int32)
    with pytest.raises(ValueError, match=r"one page vector per group of windows \[None, 4, 6\].*got 2 entries"):
        paged.unpin((no_page, no_page))
    with pytest.raises(ValueError, match="of one length"):
        paged.read_pinned((no_page, no_page, no_page[:2]), 0)
    with pytest.raises(ValueError, match="head_dim=16 must be a multiple of 32"):
        paged.with_format(jkv.Q8())
    for cache in (contiguous, paged):
        assert getattr(cache, "refcounts", None) is None
        with pytest.raises(AttributeError, match="each layer group has its own"):
            cache.num_free_pages()


@pytest.mark.parametrize("small", ["window_pages", "num_pages"])
def test_a_pool_that_refuses_makes_every_group_let_the_sequence_go(small):
    """A paged plan whose rings' pools (or its full layers' pool, a group after the first ring's) cannot hold a
    sequence's step: every group leaves that sequence as it was (count 0, its table row untouched, no page of the
    step kept: the groups that had reserved them gave them back), it is flagged, and the others' step is the
    model's."""
    cache = PlannedCache.init(SPEC, B, windows=WINDOWS, slack=SLACK, layout="paged", page_size=PAGE, **{small: 4})
    rng, model = np.random.default_rng(5), Model()
    cache = step(cache, model, rng, [4, 4, 4])  # a page per slot in every pool: 3 of the small pools' 4 taken
    counts = np.asarray([4, SLACK, 0])  # slot 0 needs one more page, slot 1 two: only one is free
    q, k, v = step_inputs(rng, B)
    outs, after = run_step(cache, jnp.asarray(counts, jnp.int32), q, k, v)
    assert np.asarray(after.lengths).tolist() == [8, 4, 4]
    assert np.asarray(after.errors).tolist() == [0, ERR_POOL_EXHAUSTED, 0]
    for old, new in zip(pools(cache), pools(after), strict=True):
        np.testing.assert_array_equal(np.asarray(new.block_tables[1]), np.asarray(old.block_tables[1]))
        tables = np.asarray(new.block_tables)
        held = np.bincount(tables[tables >= 0], minlength=new.num_pages) + np.asarray(new.pins)
        np.testing.assert_array_equal(np.asarray(new.refcounts), held)  # no page held outside the tables
    model.k[:, 0, :, 4:8], model.v[:, 0, :, 4:8] = k[:, 0, :, :4], v[:, 0, :, :4]
    for layer in range(SPEC.num_layers):
        want = model.attend(q, layer, np.asarray([4, 0, 0]))
        assert rel_err(np.asarray(outs[layer])[0], want[0]) < 1e-5, layer
