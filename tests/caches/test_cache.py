"""The contiguous KVCache (plain format): shapes, every operation against a NumPy model, errors (eager and under
jit), checkify, vmap, donation in place. Every kind's shared behaviour: test_kinds.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jkv
from jkv.caches import ERR_BAD_COUNT, ERR_BAD_SLOT, ERR_ROLLBACK_FORWARD, ERR_WRITE_OVERFLOW

SPEC = jkv.CacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, max_len=16, dtype=jnp.float32)
BATCH = 4


def rand_kv(rng, batch, t, spec=SPEC):
    shape = (batch, spec.num_kv_heads, t, spec.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), spec.dtype), jnp.asarray(rng.standard_normal(shape), spec.dtype))


def filled(rng, lengths, spec=SPEC):
    """A cache whose sequence b holds lengths[b] random positions in every layer, plus the NumPy copy."""
    lengths = np.asarray(lengths)
    cache = jkv.KVCache.init(spec, len(lengths))
    k_np = np.zeros(cache.data[0].shape, np.float32)
    v_np = np.zeros(cache.data[1].shape, np.float32)
    for b, n in enumerate(lengths):
        kb = rng.standard_normal((spec.num_layers, spec.num_kv_heads, n, spec.head_dim)).astype(np.float32)
        vb = rng.standard_normal(kb.shape).astype(np.float32)
        k_np[:, b, :, :n], v_np[:, b, :, :n] = kb, vb
    data = (jnp.asarray(k_np).astype(spec.dtype), jnp.asarray(v_np).astype(spec.dtype))
    cache = cache.replace(data=data, lengths=jnp.asarray(lengths, jnp.int32))
    return cache, k_np, v_np


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("batch", [1, 5])
def test_init_shapes_and_nbytes(dtype, batch):
    spec = SPEC.replace(dtype=dtype)
    cache = jkv.KVCache.init(spec, batch)
    shape = (3, batch, 2, 16, 8)
    chex.assert_shape(list(cache.data), shape)
    chex.assert_type(list(cache.data), dtype)
    chex.assert_shape([cache.lengths, cache.counts, cache.errors], (batch,))
    chex.assert_type([cache.lengths, cache.counts, cache.errors], jnp.int32)
    assert cache.spec == spec and cache.batch == batch and cache.max_len == 16
    itemsize = jnp.dtype(dtype).itemsize
    assert cache.nbytes == 2 * np.prod(shape) * itemsize + 3 * 4 * batch
    assert cache.nbytes == jkv.memory.cache_bytes(spec, batch)
    assert spec.bytes_per_token == 2 * 3 * 2 * 8 * itemsize


@pytest.mark.parametrize("t", [1, 3, 16])
def test_write_ragged_each_sequence_at_its_length(rng, t):
    lengths = np.array([0, min(5, 16 - t), 16 - t, min(2, 16 - t)])
    cache, k_np, v_np = filled(rng, lengths)
    k_new, v_new = rand_kv(rng, len(lengths), t)
    cache = cache.begin(t)
    out = cache.write(1, k_new, v_new)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, cache)
    for b, n in enumerate(lengths):
        k_np[1, b, :, n : n + t] = np.asarray(k_new[b])
        v_np[1, b, :, n : n + t] = np.asarray(v_new[b])
    np.testing.assert_array_equal(np.asarray(out.data[0]), k_np)
    np.testing.assert_array_equal(np.asarray(out.data[1]), v_np)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)  # write does not commit
    np.testing.assert_array_equal(np.asarray(out.commit().lengths), lengths + t)
    assert not np.asarray(out.errors).any()


def test_write_casts_to_cache_dtype(rng):
    cache = jkv.KVCache.init(SPEC.replace(dtype=jnp.bfloat16), 2)
    k_new, v_new = rand_kv(rng, 2, 2)
    out = cache.begin(2).write(0, k_new, v_new)
    chex.assert_type(out.data[0], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out.data[0])[0, :, :, :2], np.asarray(k_new.astype(jnp.bfloat16)))


def test_commit_reset_reset_slot_rollback(rng):
    cache, _, _ = filled(rng, [3, 4, 5, 6])
    np.testing.assert_array_equal(cache.begin(2).commit().lengths, [5, 6, 7, 8])
    np.testing.assert_array_equal(cache.begin(jnp.array([0, 1, 2, 3])).commit().lengths, [3, 5, 7, 9])
    np.testing.assert_array_equal(cache.begin(2).commit().counts, [0, 0, 0, 0])
    np.testing.assert_array_equal(cache.reset().lengths, [0, 0, 0, 0])
    np.testing.assert_array_equal(cache.reset_slot(2).lengths, [3, 4, 0, 6])
    np.testing.assert_array_equal(cache.rollback(jnp.array([1, 4, 0, 2])).lengths, [1, 4, 0, 2])
    np.testing.assert_array_equal(cache.rollback(3).lengths, [3, 3, 3, 3])
    # Rollback then write: the new positions replace the rolled-back ones.
    rolled = cache.rollback(2)
    k_new, v_new = rand_kv(rng, 4, 1)
    out = rolled.begin(1).write(0, k_new, v_new)
    np.testing.assert_array_equal(np.asarray(out.data[0])[0, :, :, 2], np.asarray(k_new[:, :, 0]))


@pytest.mark.parametrize("single_len", [1, 7, 16])
@pytest.mark.parametrize("slot", [0, 3])
def test_insert_into_slot_and_extract(rng, slot, single_len):
    cache, k_np, v_np = filled(rng, [2, 9, 4, 11])
    single, ks, vs = filled(rng, [single_len], SPEC.replace(max_len=single_len))
    out = cache.insert_into_slot(slot, single)
    k_np[:, slot, :, : single.max_len] = ks[:, 0]
    v_np[:, slot, :, : single.max_len] = vs[:, 0]
    np.testing.assert_array_equal(np.asarray(out.data[0]), k_np)
    np.testing.assert_array_equal(np.asarray(out.data[1]), v_np)
    expect = np.array([2, 9, 4, 11])
    expect[slot] = int(single.lengths[0])
    np.testing.assert_array_equal(np.asarray(out.lengths), expect)
    back = out.extract_slot(slot, max_len=single.max_len)
    np.testing.assert_array_equal(np.asarray(back.data[0]), np.asarray(single.data[0]))
    np.testing.assert_array_equal(np.asarray(back.lengths), np.asarray(single.lengths))


def test_fork_copies_a_row(rng):
    """fork(src, dst): dst's positions, length and error bits become src's, the others unchanged; static and traced
    slots alike; src == dst changes nothing; a slot out of range under jit flags ERR_BAD_SLOT and touches nothing;
    host calls raise naming it."""
    cache, k_np, v_np = filled(rng, [5, 0, 9, 3])
    cache = cache.replace(errors=jnp.asarray([0, 0, 2, 0], jnp.int32), counts=jnp.asarray([0, 0, 0, 4], jnp.int32))
    fork = jax.jit(lambda c, s, d: c.fork(s, d))
    for got in (cache.fork(2, 3), fork(cache, jnp.int32(2), jnp.int32(3))):
        k_np2, v_np2 = k_np.copy(), v_np.copy()
        k_np2[:, 3], v_np2[:, 3] = k_np[:, 2], v_np[:, 2]
        np.testing.assert_array_equal(got.data[0], k_np2)
        np.testing.assert_array_equal(got.data[1], v_np2)
        assert got.lengths.tolist() == [5, 0, 9, 9] and got.errors.tolist() == [0, 0, 2, 2]
        assert got.counts.tolist() == [0, 0, 0, 0]
    same = fork(cache, jnp.int32(1), jnp.int32(1))
    chex.assert_trees_all_equal(same, cache)
    bad = fork(cache, jnp.int32(0), jnp.int32(4))
    chex.assert_trees_all_equal(bad.replace(errors=cache.errors), cache)
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()
    for src, dst, name in ((4, 0, "src=4"), (0, -1, "dst=-1")):
        with pytest.raises(ValueError, match=name):
            cache.fork(src, dst)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("trim", [True, False])
def test_snapshot_restore_bit_exact(rng, dtype, trim):
    cache, _, _ = filled(rng, [3, 0, 7], SPEC.replace(dtype=dtype))
    cache = cache.replace(errors=jnp.array([0, ERR_WRITE_OVERFLOW, 0], jnp.int32))
    snap = cache.snapshot(trim=trim)
    assert isinstance(snap.data[0], np.ndarray) and snap.data[0].shape[3] == (7 if trim else 16)
    back = jkv.KVCache.restore(snap)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, cache)
    keep = snap.data[0].shape[3]
    for got, want in zip(back.data, cache.data, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[:, :, :, :keep], np.asarray(want)[:, :, :, :keep])
    np.testing.assert_array_equal(np.asarray(back.lengths), np.asarray(cache.lengths))
    np.testing.assert_array_equal(np.asarray(back.errors), np.asarray(cache.errors))
    bigger = jkv.KVCache.restore(snap, max_len=32)
    assert bigger.max_len == 32
    np.testing.assert_array_equal(np.asarray(bigger.data[0])[:, :, :, :keep], np.asarray(cache.data[0])[:, :, :, :keep])


# ---------------------------------------------------------------------- errors at the boundary
def test_errors_eager(rng):
    cache, _, _ = filled(rng, [14, 2])
    k3, v3 = rand_kv(rng, 2, 3)
    step = cache.begin(jnp.array([0, 3]))
    cases = [
        (lambda: cache.begin(3), ValueError, "must stay within [0, max_len=16]"),
        (lambda: cache.write(3, k3[:, :, :1], v3[:, :, :1]), ValueError, "layer=3 out of range"),
        (lambda: cache.write(0.0, k3, v3), TypeError, "layer must be an integer"),
        (lambda: step.write(0, k3[:, :, :2], v3[:, :, :2]), ValueError, "shorter than the step's counts=[0 3]"),
        (lambda: cache.write(0, k3[:1], v3[:1]), ValueError, "does not match"),
        (lambda: cache.write(0, k3, v3[:, :, :2]), ValueError, "must match"),
        (lambda: cache.write(0, k3[..., :4], v3[..., :4]), ValueError, "D=8"),
        (lambda: cache.write(0, k3[0], v3[0]), ValueError, "does not match a flat step's [T>=1, K=2, D=8]"),
        (lambda: cache.write(0, k3.astype(jnp.int32), v3.astype(jnp.int32)), TypeError, "floating"),
        (lambda: cache.begin(-1), ValueError, "begin(counts=[-1 -1])"),
        (lambda: cache.begin(jnp.array([1, 2, 3])), ValueError, "shape (2,)"),
        (lambda: cache.begin(1.5), TypeError, "integer"),
        (lambda: cache.begin(2**31), ValueError, "counts=2147483648 does not fit int32"),
        (lambda: cache.begin(None), TypeError, "counts must be an int or an integer array, got None"),
        (lambda: cache.begin([1, None]), TypeError, "counts must be an int or an integer array, got [1, None]"),
        (lambda: cache.rollback([1, 2.5]), TypeError, "lengths must be an int or an integer array, got dtype float64"),
        (lambda: jkv.make_cache(["paged"], SPEC, 1), TypeError, "cache kind must be a name (a str), got ['paged']"),
        (lambda: cache.rollback(jnp.array([15, 2])), ValueError, "rollback lengths=[15  2]"),
        (lambda: cache.rollback(-1), ValueError, "must lie in [0, current lengths"),
        (lambda: cache.reset_slot(2), ValueError, "slot=2 out of range: expected an index in [0, 2)"),
        (lambda: cache.insert_into_slot(-1, jkv.KVCache.init(SPEC, 1)), ValueError, "slot=-1"),
        (lambda: cache.insert_into_slot(0, jkv.KVCache.init(SPEC, 2)), ValueError, "batch=2"),
        (lambda: cache.insert_into_slot(0, jkv.KVCache.init(SPEC.replace(max_len=17), 1)), ValueError, "17"),
        (lambda: cache.insert_into_slot(0, jkv.KVCache.init(SPEC.replace(head_dim=4), 1)), ValueError, "head_dim=4"),
        (lambda: cache.insert_into_slot(0, "x"), TypeError, "must be a jkv.KVCache"),
        (lambda: cache.extract_slot(0, max_len=40), ValueError, "max_len=40"),
        (lambda: jkv.KVCache.init(SPEC, 0), ValueError, "batch must be a positive int"),
        (lambda: jkv.KVCache.init("spec", 1), TypeError, "jkv.CacheSpec"),
        (lambda: jkv.CacheSpec(2, 2, 8, 0), ValueError, "max_len must be a positive int, got 0"),
        (lambda: jkv.CacheSpec(2, 2, 8, 4, dtype=jnp.int8), TypeError, "floating dtype"),
        (lambda: jkv.CacheSpec(2, 2, 8, 4, dtype="nope"), TypeError, "floating dtype"),
        (lambda: jkv.KVCache.restore("x"), TypeError, "jkv.caches.Snapshot"),
        (lambda: jkv.KVCache.restore(cache.snapshot(), max_len=8), ValueError, "max_len=8"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    # Nothing above changed the cache it was called on.
    np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 2])


def test_errors_under_jit_flag_and_never_corrupt(rng):
    cache, k_np, _ = filled(rng, [14, 2])
    k3, v3 = rand_kv(rng, 2, 3)
    out = jax.jit(lambda c, k, v: c.begin(3).write(0, k, v))(cache, k3, v3)
    np.testing.assert_array_equal(np.asarray(out.errors), [ERR_WRITE_OVERFLOW, 0])
    np.testing.assert_array_equal(np.asarray(out.counts), [0, 3])  # the refused step has no tokens
    np.testing.assert_array_equal(np.asarray(out.data[0])[:, 0], k_np[:, 0])  # refused sequence untouched
    np.testing.assert_array_equal(np.asarray(out.data[0])[0, 1, :, 2:5], np.asarray(k3[1]))  # the other written
    with pytest.raises(RuntimeError, match="sequence 0: step past max_len"):
        out.check()
    adv = jax.jit(lambda c: c.begin(jnp.array([3, 1])).commit())(cache)
    np.testing.assert_array_equal(np.asarray(adv.lengths), [14, 3])
    np.testing.assert_array_equal(np.asarray(adv.errors), [ERR_WRITE_OVERFLOW, 0])
    neg = jax.jit(lambda c: c.begin(jnp.array([-1, 1])).commit())(cache)
    np.testing.assert_array_equal(np.asarray(neg.lengths), [14, 3])
    np.testing.assert_array_equal(np.asarray(neg.errors), [ERR_BAD_COUNT, 0])
    short = jax.jit(lambda c, k, v: c.begin(jnp.array([0, 3])).write(0, k[:, :, :2], v[:, :, :2]))(cache, k3, v3)
    np.testing.assert_array_equal(np.asarray(short.errors), [0, ERR_BAD_COUNT])
    rb = jax.jit(lambda c: c.rollback(jnp.array([10, 5])))(cache)
    np.testing.assert_array_equal(np.asarray(rb.lengths), [10, 2])
    np.testing.assert_array_equal(np.asarray(rb.errors), [0, ERR_ROLLBACK_FORWARD])
    bad = jax.jit(lambda c, s, i: c.insert_into_slot(i, s))(cache, jkv.KVCache.init(SPEC, 1), 7)
    np.testing.assert_array_equal(np.asarray(bad.data[0]), np.asarray(cache.data[0]))
    np.testing.assert_array_equal(np.asarray(bad.lengths), [14, 2])
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()
    with pytest.raises(RuntimeError, match="slot index out of range"):
        bad.check()
    assert cache.check() is cache
    np.testing.assert_array_equal(np.asarray(out.clear_errors().errors), [0, 0])
    np.testing.assert_array_equal(np.asarray(out.reset().errors), [0, 0])


def test_checkify_path_raises_inside_jit(rng):
    cache, _, _ = filled(rng, [15, 2])
    k2, v2 = rand_kv(rng, 2, 2)
    step = checkify.checkify(jax.jit(lambda c, k, v: c.begin(2).write(0, k, v).commit().checkify_errors()))
    err, _ = step(cache, k2, v2)
    with pytest.raises(
        checkify.JaxRuntimeError, match=r"jkv cache recorded errors inside jit, bits per sequence \[1 0\]"
    ):
        err.throw()
    err, _ = step(cache.rollback(jnp.array([3, 2])), k2, v2)
    err.throw()  # within bounds: no error


def test_vmap_over_stacked_caches(rng):
    """Each op composes with vmap: a stack of two independent caches (e.g. two models) updated at once."""
    caches = [filled(rng, [1, 4])[0], filled(rng, [6, 0])[0]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *caches)
    k1 = jnp.asarray(rng.standard_normal((2, 2, 2, 1, 8)), jnp.float32)

    def step(c, k):
        return c.begin(1).write(1, k, k).commit().rollback(c.lengths).reset_slot(0)

    out = jax.vmap(step)(stacked, k1)
    for i, c in enumerate(caches):
        ref = c.begin(1).write(1, k1[i], k1[i]).commit().rollback(c.lengths).reset_slot(0)
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], out), ref)


def test_jitted_step_serves_every_position_without_recompiling(rng):
    cache = jkv.KVCache.init(SPEC, 2)
    step = jax.jit(lambda c, k: c.begin(1).write(0, k, k).commit(), donate_argnums=0)
    for _ in range(5):
        cache = step(cache, rand_kv(rng, 2, 1)[0])
    assert step._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(cache.lengths), [5, 5])


def test_donated_step_runs_in_place(rng):
    """The compiled step aliases the whole donated cache to its output and allocates no second copy."""
    spec = jkv.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, max_len=1024, dtype=jnp.float32)
    cache = jkv.KVCache.init(spec, 8)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 1, 64)), jnp.float32)

    def step(c, k):
        c = c.begin(1)
        for layer in range(spec.num_layers):
            c = c.write(layer, k, k)
        return c.commit()

    buffer = cache.data[0].nbytes
    stats = jax.jit(step, donate_argnums=0).lower(cache, k_new).compile().memory_analysis()
    assert stats.alias_size_in_bytes >= 2 * buffer
    assert stats.temp_size_in_bytes < buffer // 16, stats  # scratch only, no copy of a K or V buffer
    # Without donation the same program must allocate a fresh output (the check above can fail).
    plain = jax.jit(step).lower(cache, k_new).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0

    stats = (
        jax.jit(lambda c, s: c.insert_into_slot(3, s), donate_argnums=0)
        .lower(cache, jkv.KVCache.init(spec.replace(max_len=128), 1))
        .compile()
        .memory_analysis()
    )
    assert stats.temp_size_in_bytes < buffer // 16, stats
