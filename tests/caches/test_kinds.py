"""Every registered cache kind through the same protocol tests: step semantics (begin / write / commit, ragged),
stored values against float64 NumPy within each format's stated bound, slots, snapshots, errors inside and outside
jit (hardening: every index range-checked, nothing wrapped or clamped), and the in-place donated step.

Writes, layer reads and slot copies run through the module's jitted functions (one compilation per kind and shape,
shared by the tests); the host path (eager calls with concrete values) is exercised where it raises, and by the
bookkeeping operations (begin, commit, rollback, reset) the tests call eagerly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import bound

import jkv
from jkv.caches import (
    ERR_BAD_LAYER,
    ERR_BAD_SLOT,
    ERR_POOL_EXHAUSTED,
    ERR_ROLLBACK_FORWARD,
    ERR_VALUE_RANGE,
    ERR_WRITE_OVERFLOW,
)

KINDS = jkv.kinds()
# max_len 256: a step's scratch is small beside a stored array (test_donated_step_runs_in_place)
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=256, dtype=jnp.float32)


def make(kind, batch=3, spec=SPEC, **options):
    if jkv.caches.kind(kind).paged:
        options.setdefault("page_size", 8)
    return jkv.make_cache(kind, spec, batch, **options)


def rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


T = 5  # tokens of a padded step: the steps of this file share one shape, so one compilation per kind


def kv(rng, t=T, batch=3):
    """New keys and values of every layer, ``[L, B, K, t, D]`` each."""
    return rand(rng, 2, batch, 2, t, 64), rand(rng, 2, batch, 2, t, 64)


def step_fn(cache, counts, k, v):
    """begin(counts), every layer writes its ``k[layer]``, ``v[layer]``, commit."""
    cache = cache.begin(counts)
    for layer in range(cache.spec.num_layers):
        cache = cache.write(layer, k[layer], v[layer])
    return cache.commit()


_step = jax.jit(step_fn)
_donated_step = jax.jit(step_fn, donate_argnums=0)
_write = jax.jit(lambda c, i, k: c.write(i, k, k))  # a traced layer index
_write0_commit = jax.jit(lambda c, k: c.write(0, k, k).commit())
_read = jax.jit(lambda c, i: c.layer(i)[0])  # a traced layer index
_extract = jax.jit(lambda c, s: c.extract_slot(s))
_extract_to = jax.jit(lambda c, s, max_len: c.extract_slot(s, max_len), static_argnums=(1, 2))
_reset_slot = jax.jit(lambda c, s: c.reset_slot(s))
_rollback = jax.jit(lambda c, n: c.rollback(n))
_insert = jax.jit(lambda c, s, single: c.insert_into_slot(s, single))


@jax.jit
def _layers(cache):
    kv = [cache.layer(layer, jnp.float32) for layer in range(cache.spec.num_layers)]
    return jnp.stack([k for k, _ in kv]), jnp.stack([v for _, v in kv])


def layers(cache):
    """K and V of every layer as float32 NumPy ``[L, B, K, S, D]`` (decoded, every position); sliced on the host
    (a slice of a device array compiles a program per shape)."""
    return tuple(np.asarray(x) for x in _layers(cache))


def counts_of(*counts):
    return jnp.asarray(counts, jnp.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_ragged_step_stores_each_sequence_at_its_length(rng, kind):
    """Two steps with ragged counts: every sequence's stored values equal float64 NumPy within the format's
    bound; padding tokens (t >= counts[b]) and positions past the lengths are never written."""
    cache = make(kind)
    want = {name: np.full((2, 3, 2, 256, 64), np.nan) for name in "kv"}
    lengths = np.zeros(3, int)
    for counts in ([5, 2, 0], [1, 4, 3]):
        k, v = kv(rng)
        cache = _step(cache, counts_of(*counts), k, v)
        for b, n in enumerate(counts):
            for name, x in zip("kv", (k, v), strict=True):
                want[name][:, b, :, lengths[b] : lengths[b] + n] = np.asarray(x)[:, b, :, :n]
        lengths += counts
    np.testing.assert_array_equal(cache.lengths, lengths)
    np.testing.assert_array_equal(cache.counts, 0)
    assert not np.asarray(cache.errors).any()
    for name, got in zip("kv", layers(cache), strict=True):
        got = np.asarray(got, np.float64)
        assert got.shape == (2, 3, 2, 256, 64)
        for layer in range(2):
            for b in range(3):
                w, g = want[name][layer, b, :, : lengths[b]], got[layer, b, :, : lengths[b]]
                assert (np.abs(g - w) <= bound(kind, w)).all(), (kind, name, layer, b, np.abs(g - w).max())


@pytest.mark.parametrize("kind", KINDS)
def test_batch_composition_does_not_change_a_sequence(rng, kind):
    """A sequence's stored values are the same (bit for bit) whether it steps alone or with others."""
    k, v = kv(rng)
    both = layers(_step(make(kind), counts_of(4, 3, 1), k, v))
    alone = layers(_step(make(kind), counts_of(4, 0, 0), k, v))
    for got, want in zip(both, alone, strict=True):
        np.testing.assert_array_equal(got[:, 0, :, :4], want[:, 0, :, :4])


@pytest.mark.parametrize("kind", KINDS)
def test_capacity_errors_host_and_jit(rng, kind):
    full = SPEC.max_len - 2
    cache = make(kind).begin(jnp.asarray([full, 0, 0])).commit()
    with pytest.raises(ValueError, match="max_len"):
        cache.begin(3)
    before = layers(cache)
    after = _step(cache, counts_of(3, 3, 3), *kv(rng))
    np.testing.assert_array_equal(after.errors, [ERR_WRITE_OVERFLOW, 0, 0])
    np.testing.assert_array_equal(after.lengths, [full, 3, 3])
    for got, want in zip(layers(after), before, strict=True):
        np.testing.assert_array_equal(got[:, 0], want[:, 0])
    with pytest.raises(RuntimeError, match="sequence 0: step past max_len"):
        after.check()


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_brought_to_the_host_is_refused_eagerly_and_taken_under_jit(rng, kind):
    """``jax.device_get(cache)`` leaves NumPy arrays: an eager ``begin`` or ``write`` names the way back (not an
    AttributeError from deep inside); a jitted step takes it as it takes any array; ``device_put`` restores it."""
    cache = _step(make(kind), counts_of(2, 1, 3), *kv(rng))
    host = jax.device_get(cache)
    assert any(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    with pytest.raises(TypeError, match=r"begin needs a cache of JAX arrays.*jax.device_put\(cache\)"):
        host.begin(1)
    k = rand(rng, 3, 2, T, 64)
    with pytest.raises(TypeError, match=r"write needs a cache of JAX arrays.*jax.device_put\(cache\)"):
        host.write(0, k, k)
    want = layers(_step(cache, counts_of(1, 1, 1), *kv(np.random.default_rng(5))))
    for got_host in (_step(host, counts_of(1, 1, 1), *kv(np.random.default_rng(5))),
                     _step(jax.device_put(host), counts_of(1, 1, 1), *kv(np.random.default_rng(5)))):  # fmt: skip
        for got, w in zip(layers(got_host), want, strict=True):
            np.testing.assert_array_equal(got, w)
    jax.device_put(host).begin(1)  # eager again once on the device


@pytest.mark.parametrize("kind", KINDS)
def test_traced_layer_out_of_range_writes_nothing(rng, kind):
    """A traced layer of -1 or L never writes the last (or any) layer: ERR_BAD_LAYER, nothing touched."""
    cache = make(kind).begin(2)
    k = rand(rng, 3, 2, 2, 64)
    for bad in (-1, 2):
        out = _write(cache, jnp.int32(bad), k)
        np.testing.assert_array_equal(out.errors, [ERR_BAD_LAYER] * 3)
        for a, b in zip(jax.tree.leaves(out.storage()), jax.tree.leaves(cache.storage()), strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.isnan(np.asarray(_read(cache, jnp.int32(bad)))).all()
    with pytest.raises(ValueError, match="layer=-1 out of range"):
        cache.write(-1, k, k)


@pytest.mark.parametrize("kind", KINDS)
def test_slot_indices_out_of_range(rng, kind):
    """extract_slot(B) under jit is an empty cache flagged ERR_BAD_SLOT, never slot B-1; reset_slot and
    insert_into_slot out of range change nothing but the flag; host calls raise."""
    cache = _step(make(kind), counts_of(4, 4, 4), *kv(rng))
    got = _extract(cache, jnp.int32(3))
    np.testing.assert_array_equal(got.lengths, [0])
    np.testing.assert_array_equal(got.errors, [ERR_BAD_SLOT])
    assert not np.asarray(got.storage()[0]).any()
    reset = _reset_slot(cache, jnp.int32(-1))
    np.testing.assert_array_equal(reset.lengths, [4, 4, 4])
    np.testing.assert_array_equal(reset.errors, [ERR_BAD_SLOT] * 3)
    for call in (lambda: cache.extract_slot(3), lambda: cache.reset_slot(-1)):
        with pytest.raises(ValueError, match=r"slot=.* out of range"):
            call()


@pytest.mark.parametrize("kind", KINDS)
def test_host_integers_are_checked_before_narrowing(kind):
    """2**32 + 1 is refused, not wrapped to 1."""
    cache = make(kind)
    for call in (
        lambda: cache.rollback(np.asarray([2**32 + 1] * 3, np.int64)),
        lambda: cache.rollback(2**32 + 1),
        lambda: cache.begin(2**32 + 1),
    ):
        with pytest.raises(ValueError, match="does not fit int32"):
            call()


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_reset_and_flags(rng, kind):
    cache = _step(make(kind), counts_of(5, 4, 2), *kv(rng))
    cache = cache.rollback(jnp.asarray([3, 4, 0]))
    np.testing.assert_array_equal(cache.lengths, [3, 4, 0])
    with pytest.raises(ValueError, match="rollback"):
        cache.rollback(jnp.asarray([4, 4, 0]))
    flagged = _rollback(cache, jnp.asarray([4, 1, 0]))
    np.testing.assert_array_equal(flagged.lengths, [3, 1, 0])
    np.testing.assert_array_equal(flagged.errors, [ERR_ROLLBACK_FORWARD, 0, 0])
    np.testing.assert_array_equal(flagged.clear_errors().errors, 0)
    np.testing.assert_array_equal(cache.reset_slot(1).lengths, [3, 0, 0])
    np.testing.assert_array_equal(cache.reset().lengths, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_insert_extract_snapshot_restore_bit_exact(rng, kind):
    lengths = [5, 2, 4]
    cache = _step(make(kind), counts_of(*lengths), *kv(rng))
    single = _extract_to(cache, 2, 16)
    assert single.batch == 1 and single.max_len == 16 and int(single.lengths[0]) == 4
    moved = _insert(cache.reset_slot(0), 0, single)
    np.testing.assert_array_equal(moved.lengths, [4, 2, 4])
    for got, want in zip(layers(moved), layers(cache), strict=True):
        np.testing.assert_array_equal(got[:, 0, :, :4], want[:, 2, :, :4])
    snap = cache.snapshot()
    layout = jkv.caches.registry.LAYOUTS[cache.layout]
    options = {"page_size": cache.page_size} if cache.layout == "paged" else {}
    back = layout.restore(snap, **options)
    np.testing.assert_array_equal(back.lengths, cache.lengths)
    for got, want in zip(layers(back), layers(cache), strict=True):
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(got[:, b, :, :n], want[:, b, :, :n])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_values_beyond_the_format_never_store_nan(kind, layout):
    """|x| = 1e7 is beyond a float16 Q8 scale (about 8.3e6): host writes raise, jitted writes store finite
    saturated values and flag ERR_VALUE_RANGE, alike on both layouts; other formats store it."""
    if jkv.caches.kind(kind).layout != layout:
        pytest.skip("one layout per kind")
    x = jnp.full((3, 2, 1, 64), 1e7, jnp.float32)
    cache = make(kind).begin(1)
    q8 = isinstance(jkv.caches.kind(kind).format, jkv.Q8)
    if q8:
        with pytest.raises(ValueError, match="beyond what the"):
            cache.write(0, x, x)
    out = _write0_commit(cache, x)
    np.testing.assert_array_equal(out.errors, [ERR_VALUE_RANGE if q8 else 0] * 3)
    assert np.isfinite(np.asarray(layers(out)[0][0, :, :, :1])).all()


def test_impossible_sizes_raise_before_allocating():
    with pytest.raises(ValueError, match="elements"):
        jkv.KVCache.init(jkv.CacheSpec(2, 2, 64, 2**62), batch=4)
    with pytest.raises(ValueError, match="bytes of the local devices"):
        jkv.KVCache.init(jkv.CacheSpec(2, 2, 64, 2**40), batch=4)
    with pytest.raises(ValueError, match="bytes of the local devices"):
        jkv.PagedKVCache.init(jkv.CacheSpec(2, 2, 64, 2**40), batch=4, page_size=2**20)
    with pytest.raises(ValueError, match=r"cache of batch=68719476736, num_pages=8 .* bytes of the local devices"):
        jkv.PagedKVCache.init(jkv.CacheSpec(2, 2, 64, 256), batch=2**36, page_size=16, num_pages=8)  # the tables


@jax.jit
def _fp8_round_trip(x):
    fmt = jkv.FP8()
    return fmt.decode(fmt.encode(x, x), jnp.float32)


def test_fp8_round_trip_within_its_stated_bound(rng):
    """fp8: each value within |x| / 16 + max|x| / (448 * 1024) of float64 NumPy, across magnitudes."""
    x = rng.standard_normal((4, 2, 16, 64)) * np.exp(rng.uniform(-8, 8, (4, 2, 16, 1)))
    x[0, 0, 0] = 0.0
    k, v = _fp8_round_trip(jnp.asarray(x, jnp.float32))
    err = np.abs(np.asarray(k, np.float64) - x)
    assert (err <= bound("fp8", x) + np.abs(x) * 2**-23).all(), err.max()
    assert (err > 0).any()  # it does round: the bound is not vacuous
    np.testing.assert_array_equal(k, v)
    np.testing.assert_array_equal(np.asarray(k)[0, 0, 0], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_donated_step_runs_in_place(rng, kind):
    """A jitted step (begin, every layer's write, commit) with the cache donated updates it in place: the
    compiled program aliases every stored array and allocates no copy of one."""
    cache = make(kind)
    args = (cache, counts_of(1, 3, 0), *kv(rng))  # the shapes of the other tests' steps: _step is compiled once
    stored = sum(x.nbytes for x in jax.tree.leaves(cache.storage()) if x.ndim == 5)
    largest = max(x.nbytes for x in jax.tree.leaves(cache.storage()))
    stats = _donated_step.lower(*args).compile().memory_analysis()
    assert stats.alias_size_in_bytes >= stored
    # XLA:CPU scatters bfloat16 and float8 through a float32 temporary (its float normalization), so the
    # no-copy check holds on the CPU for the other dtypes only; the aliasing above holds for every kind.
    widened = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float8_e4m3fn)}
    if jax.default_backend() != "cpu" or not widened & {x.dtype for x in jax.tree.leaves(cache.storage())}:
        assert stats.temp_size_in_bytes < largest // 4, stats  # scratch only, no copy of a stored array
    plain = _step.lower(*args).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0


def test_registry_lists_every_kind_once():
    assert KINDS == ("bf16", "f32", "q8", "fp8", "paged", "q8-paged", "fp8-paged")
    for name in KINDS:
        cache = make(name, batch=1)
        kind = jkv.caches.kind(name)
        assert cache.layout == kind.layout and type(cache.format) is type(kind.format)
        assert kind.bytes_per_token(SPEC) == cache.format.bytes_per_token(cache.spec)
    assert jkv.caches.kind("q8").bytes_per_token(SPEC) == 2 * 2 * 2 * (64 + 2 * 2)
    assert jkv.caches.kind("fp8").bytes_per_token(SPEC) == 2 * 2 * 2 * (64 + 4)
    with pytest.raises(ValueError, match="not one of"):
        jkv.make_cache("int4", SPEC, 1)


def test_paged_pool_exhaustion_flags_and_touches_nothing(rng):
    cache = make("paged", num_pages=5)  # 2 pages of 8 a sequence for 16 tokens: the pool holds 5
    with pytest.raises(ValueError, match="page pool exhausted"):
        cache.begin(16)
    out = _step(cache, counts_of(16, 16, 16), *kv(rng, t=16))
    np.testing.assert_array_equal(out.lengths, [16, 16, 0])
    np.testing.assert_array_equal(out.errors, [0, 0, ERR_POOL_EXHAUSTED])
    np.testing.assert_array_equal(out.pages_held(), [2, 2, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_every_array_is_its_own_buffer(kind):
    """After init, reset, commit and rollback no two arrays of a cache share a buffer: donating the cache to a
    jitted step donates each once (XLA refuses a buffer donated twice)."""
    cache = make(kind)
    for c in (cache, cache.reset(), cache.begin(1).commit(), cache.rollback(0)):
        leaves = jax.tree.leaves(c)
        pointers = [x.unsafe_buffer_pointer() for x in leaves]
        assert len(set(pointers)) == len(leaves)
