"""Q8 pages (a PagedKVCache in the Q8 format) against the contiguous Q8 cache on the same data.

Quantization is per vector, so the same writes give the same codes and scales wherever a position lives: every
operation is compared *exactly* (codes and scales of the valid positions) with a contiguous Q8 cache that
received the same writes. Attention through the pages (XLA reference and Pallas kernel) must equal attention over
the contiguous Q8 cache holding the same logical contents, on randomly permuted pages with NaN scales in every
page and row no sequence uses. (The paged Q8 kernel itself: tests/kernels/test_paged_q8_kernel.py.)
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cache_helpers import _begin, _commit, _fork, _insert, _reset_slot, _rollback, _write
from conftest import REL_TOL, rel_err
from kernel_inputs import KERNEL_TOL, q8_pools
from paged_helpers import _flat, assert_allocator_consistent, assert_donated_ops_in_place, assert_same_contents, valid
from reference import attention_f64, decode_attention_f64

import jkv
from jkv.caches import ERR_BAD_SLOT, ERR_WRITE_OVERFLOW, NO_PAGE
from jkv.models import llama
from jkv.serving import Engine, SamplingParams
from pallas_kernels import backend

ON_GPU = backend.gpu_backend() == backend.TRITON
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=32, dtype=jnp.float32)
PAGE = 8

_insert_shared = jax.jit(lambda c, i, single, pages, n: c.insert_into_slot(i, single, prefix=(pages, n)))
_pin = jax.jit(lambda c, i, n: c.pin(i, n))
_unpin = jax.jit(lambda c, pages: c.unpin(pages))
_extract = jax.jit(lambda c, slot, max_len=None: c.extract_slot(slot, max_len), static_argnums=(1, 2))
_with_format = jax.jit(lambda c, fmt: c.with_format(fmt), static_argnums=1)
_read_pinned = jax.jit(lambda c, pages, n: c.read_pinned(pages, n))
_attend = jax.jit(lambda q, c, layer, impl=None: jkv.attend(q, c, layer, impl=impl), static_argnums=(2, 3))
_layer_f32 = jax.jit(lambda c, layer: c.layer(layer, jnp.float32), static_argnums=1)
_restart = jax.jit(lambda c: c.rollback(c.lengths - 1).begin(1))  # the last position again, as a step


def rand_kv(rng, batch, t):
    shape = (batch, SPEC.num_kv_heads, t, SPEC.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))


def step_both(rng, paged_cache, ref, t, advance=None):
    """A step of T <= 8 tokens (or ``advance[b]``) on both caches, its writes padded to 8: one compiled write per
    cache type and batch."""
    n = np.full(ref.batch, t, np.int32) if advance is None else np.asarray(advance, np.int32)
    assert t <= 8, t
    paged_cache, ref = _begin(paged_cache, n), _begin(ref, n)
    for layer in range(SPEC.num_layers):
        k, v = rand_kv(rng, ref.batch, 8)
        paged_cache, ref = _write(paged_cache, layer, k, v), _write(ref, layer, k, v)
    paged_cache, ref = _commit(paged_cache), _commit(ref)
    assert not np.asarray(paged_cache.errors).any() and not np.asarray(ref.errors).any()
    return paged_cache, ref


def new_pair(batch, num_pages):
    paged_cache = jkv.make_cache("q8-paged", SPEC, batch, page_size=PAGE, num_pages=num_pages)
    return paged_cache, jkv.make_cache("q8", SPEC, batch)


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_init_shapes_and_nbytes(scale_dtype):
    fmt = jkv.Q8(scale_dtype=scale_dtype)
    cache = jkv.PagedKVCache.init(SPEC.replace(dtype=jnp.bfloat16), 3, page_size=PAGE, num_pages=5, format=fmt)
    k, ks, v, vs = cache.pages
    chex.assert_shape([k, v], (2, 5, 2, PAGE, 32))
    chex.assert_shape([ks, vs], (2, 5, 2, PAGE, 1))
    assert k.dtype == jnp.int8 and ks.dtype == jnp.dtype(scale_dtype)
    assert cache.spec == SPEC.replace(dtype=jnp.bfloat16)
    assert (np.asarray(cache.block_tables) == NO_PAGE).all() and int(cache.num_free_pages()) == 5
    pools = 2 * 2 * 5 * 2 * PAGE * (32 + jnp.dtype(scale_dtype).itemsize)
    assert cache.nbytes == pools + 4 * (3 * 4 + 5 + 5 + 3 + 3 + 3)  # tables, refcounts, pins, lengths, counts, errors


# ---------------------------------------------------------------------- operations against the Q8KVCache
def test_ops_match_q8_cache_on_a_fragmented_pool(rng):
    """Writes across page boundaries, ragged steps, reset_slot and rollback on a fragmented pool; then insert
    (a Q8 cache as it is, a float cache quantized), extract_slot, with_format, snapshot / restore, from_contiguous."""
    paged_cache, ref = new_pair(4, 16)
    for i, advance in enumerate((None, None, [7, 0, 3, 7])):  # T = 7 throughout: one compiled write per cache
        paged_cache, ref = step_both(rng, paged_cache, ref, 7, advance)
        if i == 1:
            paged_cache, ref = _reset_slot(_reset_slot(paged_cache, 1), 2), _reset_slot(_reset_slot(ref, 1), 2)
        assert_same_contents(paged_cache, ref)
    paged_cache, ref = _rollback(paged_cache, jnp.array([20, 7, 2, 17])), _rollback(ref, jnp.array([20, 7, 2, 17]))
    assert_same_contents(paged_cache, ref)
    assert_allocator_consistent(paged_cache)
    tables = np.asarray(paged_cache.block_tables)
    assert not (np.diff(tables[tables >= 0]) == 1).all(), tables  # pages out of order

    single = _begin(jkv.make_cache("q8", SPEC.replace(max_len=20), 1), 17)
    k, v = rand_kv(rng, 1, 17)
    for layer in range(SPEC.num_layers):
        single = _write(single, layer, k, v)
    single = _commit(single)
    paged_cache, ref = _insert(paged_cache, 1, single), _insert(ref, 1, single)
    assert_same_contents(paged_cache, ref)
    flat = _with_format(single, jkv.Plain())  # a float cache: quantized on the way in, to about the same codes
    got, want = _flat(_insert(paged_cache, 1, flat)).data[0], _flat(paged_cache).data[0]
    assert np.abs(np.asarray(got, int) - np.asarray(want, int)).max() <= 1  # the rotation's rounding
    assert_allocator_consistent(paged_cache)

    for slot, max_len in ((1, None), (3, 12)):
        got, want = _extract(paged_cache, slot, max_len), _extract(ref, slot, max_len)
        assert got.layout == "contiguous" and got.format == ref.format and got.data[0].shape == want.data[0].shape
        assert_same_contents(got, want)
    deq, want = _with_format(_flat(paged_cache), jkv.Plain()), _with_format(ref, jkv.Plain())
    in_place = _with_format(paged_cache, jkv.Plain())  # the pool re-stored: tables and pages kept
    assert in_place.format == jkv.Plain(SPEC.dtype) and (in_place.block_tables == paged_cache.block_tables).all()
    for b, n in enumerate(np.asarray(ref.lengths)):
        np.testing.assert_array_equal(np.asarray(deq.data[0])[:, b, :, :n], np.asarray(want.data[0])[:, b, :, :n])
        for x, y in zip(_flat(in_place).data, want.data, strict=True):
            np.testing.assert_array_equal(np.asarray(x)[:, b, :, :n], np.asarray(y)[:, b, :, :n])

    snap = paged_cache.snapshot()
    assert isinstance(snap, jkv.Snapshot) and snap.data[0].shape[3] == 20 and snap.format == ref.format
    restored = jkv.PagedKVCache.restore(snap, page_size=4, num_pages=20)
    assert (restored.page_size, restored.num_pages, restored.format) == (4, 20, ref.format)
    assert_same_contents(restored, ref)  # through from_contiguous(Q8KVCache.restore(snap))


def test_fork_copy_on_write_pin_and_shared_insert(rng):
    paged_cache, ref = new_pair(4, 16)
    for _ in range(2):  # sequence 0: one full page and 6 positions of the next
        paged_cache, ref = step_both(rng, paged_cache, ref, 7, advance=[7, 0, 0, 0])
    forked, ref_f = _fork(paged_cache, 0, 2), _insert(ref, 2, _extract(ref, 0))
    row = np.asarray(forked.block_tables)[0]
    np.testing.assert_array_equal(np.asarray(forked.block_tables)[2], row)
    grown, ref_g = step_both(rng, forked, ref_f, 7, advance=[1, 0, 1, 0])  # both write the shared partial page
    assert_same_contents(grown, ref_g)  # copied (codes and scales) before the write
    after = np.asarray(grown.block_tables)
    assert after[2, 0] == row[0] and after[2, 1] != row[1] and after[0, 1] == row[1]
    assert_allocator_consistent(grown)

    # A prefix cache's path: pin, retire, continue a prefill from the pinned pages, admit sharing them, unpin.
    pinned, pages = _pin(paged_cache, 0, 14)
    codes0 = valid(ref, 0)
    pinned, ref = _reset_slot(pinned, 0), _reset_slot(ref, 0)
    read = _read_pinned(pinned, pages[:2], 10)
    assert read.format == ref.format and read.max_len == 2 * PAGE and int(read.lengths[0]) == 10
    np.testing.assert_array_equal(np.asarray(read.data[1])[:, 0, :, :10], codes0[1][:, :, :10])
    single = _insert(jkv.make_cache("q8", SPEC, 1), 0, read)
    single, _ = step_both(rng, single, _insert(jkv.make_cache("q8", SPEC, 1), 0, read), 7)
    admitted, ref = _insert_shared(pinned, 1, single, pages, 10), _insert(ref, 1, single)
    assert_same_contents(admitted, ref)
    after = np.asarray(admitted.block_tables)[1]
    assert after[0] == row[0] and after[1] not in row[:2]  # full page shared, partial one copied
    for got, want in zip(valid(_read_pinned(admitted, pages[:2], 14), 0), codes0, strict=True):
        np.testing.assert_array_equal(got, want)  # the pinned pages kept their contents
    freed = _unpin(admitted, pages)
    assert_allocator_consistent(freed)
    assert_same_contents(freed, ref)


def test_errors(rng):
    paged_cache, ref = new_pair(4, 16)
    for _ in range(4):
        paged_cache, ref = step_both(rng, paged_cache, ref, 7)  # lengths 28
    k3, v3 = rand_kv(rng, 4, 5)
    one = jkv.make_cache("q8", SPEC, 1)
    q8_paged = lambda spec, **kw: jkv.PagedKVCache.init(spec, 1, page_size=8, format=jkv.Q8(**kw))
    cases = [
        (lambda: q8_paged(SPEC.replace(head_dim=16)), ValueError, "multiple of 32"),
        (lambda: q8_paged(SPEC, scale_dtype=jnp.int8), TypeError, "scale_dtype"),
        (lambda: paged_cache.begin(5), ValueError, "must stay within [0, max_len=32]"),
        (lambda: paged_cache.insert_into_slot(0, "x"), TypeError, "single must be a jkv.KVCache"),
        (
            lambda: paged_cache.insert_into_slot(0, jkv.make_cache("q8", SPEC.replace(num_kv_heads=1), 1)),
            ValueError,
            "num_kv_heads",
        ),
        (lambda: paged_cache.insert_into_slot(4, one), ValueError, "slot=4"),
        (lambda: jkv.PagedKVCache.from_contiguous("x", page_size=8), TypeError, "cache must be a jkv.KVCache"),
        (lambda: jkv.PagedKVCache.restore("x", page_size=8), TypeError, "snap must be a jkv.caches.Snapshot"),
        (lambda: jkv.PagedKVCache.from_contiguous(ref, page_size=8, num_pages=15), ValueError, "need 16"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    over = jax.jit(lambda c, k, v: c.begin(5).write(0, k, v))(paged_cache, k3, v3)
    np.testing.assert_array_equal(np.asarray(over.errors), [ERR_WRITE_OVERFLOW] * 4)
    chex.assert_trees_all_equal(over.pages, paged_cache.pages)
    bad = _fork(paged_cache, 5, 0)
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()


def test_donated_steps_run_in_place(rng):
    """A jitted begin + write-every-layer + commit step, fork/rollback/reset_slot and insert alias the donated
    pools (codes and scales) and allocate no copy of them."""
    spec = jkv.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=128, max_len=1024, dtype=jnp.float32)
    cache = jkv.make_cache("q8-paged", spec, 8)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 1, 128)), jnp.float32)
    assert_donated_ops_in_place(cache, jkv.make_cache("q8", spec.replace(max_len=128), 1), k_new)


# ---------------------------------------------------------------------- attention
def cache_of(pools, tables, lengths, counts, dtype=jnp.float32):
    """A plain (not rotated) Q8 paged cache over hand-built pools, in a step of ``counts`` tokens."""
    num_layers, num_pages, kv_heads, page_size, head_dim = pools[0].shape
    tables = jnp.asarray(tables)
    spec = jkv.CacheSpec(num_layers, kv_heads, head_dim, tables.shape[1] * page_size, dtype)
    return jkv.PagedKVCache(
        tuple(pools),
        tables,
        jnp.zeros(num_pages, jnp.int32),  # refcounts: not used by attention
        jnp.zeros(num_pages, jnp.int32),  # pins
        jnp.asarray(lengths, jnp.int32),
        jnp.full(len(lengths), counts, jnp.int32),
        jnp.zeros(len(lengths), jnp.int32),
        spec=spec,
        format=jkv.Q8(scale_dtype=pools[1].dtype, rotated=False),
    )


def contract(rng, *, lengths=(1, 40, 97, 128), page_size=16, head_dim=64, q_dtype=jnp.float32, impl="pallas"):
    """The seeds' contract for Q8 pages: the relative difference between ``jkv.attend`` at T = 1 on a paged Q8
    cache (permuted pages, NaN scales wherever unused, stale table entries) and on the same logical contents as
    a contiguous Q8 cache."""
    pools, tables, _ = q8_pools(rng, len(lengths), 2, head_dim, page_size, 8, lengths, (2, 1), True)
    cache = cache_of(pools, tables, np.asarray(lengths) - 1, 1)  # the step's one new key sits at lengths - 1
    flat = cache.to_contiguous().replace(counts=cache.counts)
    assert flat.layout == "contiguous" and flat.format == cache.format
    q = jnp.asarray(rng.standard_normal((len(lengths), 1, 8, head_dim)), q_dtype)
    got = _attend(q, cache, 1, impl)
    want = _attend(q, flat, 1, impl)
    assert got.shape == q.shape and got.dtype == q.dtype
    return rel_err(got.astype(jnp.float32), want.astype(jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_paged_equals_contiguous_q8(rng, impl):
    """XLA path: the same dequantized values in the same order (bit-equal); the kernel: the same block of keys
    as the contiguous Q8 kernel (4 pages of 16 = 64 keys), so equal to float32 rounding."""
    assert contract(rng, impl=impl) < (1e-7 if impl == "xla" else 1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_rotated_pages_attend_like_rotated_slots(rng, impl):
    """Q8 pages and slots of the registry are both rotated: the same writes give the same codes, and decode
    attention (the Pallas path rotating q and the output around the paged kernel) equals the contiguous cache's
    and float64 attention over the rotated-back values."""
    paged_cache, ref = new_pair(3, 12)
    assert paged_cache.format.rotated and ref.format.rotated
    paged_cache, ref = step_both(rng, paged_cache, ref, 5)
    paged_cache, ref = step_both(rng, paged_cache, ref, 1, advance=[1, 0, 1])  # ragged
    assert_same_contents(paged_cache, ref)
    assert _flat(paged_cache).format.rotated
    q = jnp.asarray(rng.standard_normal((3, 1, 4, SPEC.head_dim)), jnp.float32)
    paged_cache, ref = _restart(paged_cache), _restart(ref)
    got = _attend(q, paged_cache, 1, impl)[:, 0]
    assert rel_err(got, _attend(q, ref, 1, impl)[:, 0]) < 1e-6
    k, v = _layer_f32(paged_cache, 1)
    want = decode_attention_f64(q[:, 0], k, v, np.asarray(paged_cache.lengths) + 1)
    assert rel_err(got, want) < KERNEL_TOL["float32-gpu" if ON_GPU and impl == "pallas" else "float32"]


def test_prefill_attention_matches_float64(rng):
    attended = np.array([9, 32, 17])
    pools, tables, (k, v) = q8_pools(rng, 3, 2, 32, PAGE, 4, attended, (2, 1), True)
    t = 2  # prefill of the last T written tokens: query t sits at lengths + t
    cache = cache_of(pools, tables, attended - t, t)
    q = rng.standard_normal((3, t, 4, 32))
    out = _attend(jnp.asarray(q, jnp.float32), cache, 1)
    positions = (attended - t)[:, None] + np.arange(t)[None, :]
    assert rel_err(out, attention_f64(q, k, v, positions)) < REL_TOL["float32"]


# ---------------------------------------------------------------------- the engine over Q8 pages
def test_engine_q8_pages_equal_q8_slots(rng):
    """The "q8-paged" engine gives the "q8" engine's tokens (the same codes, attended in the same order), also
    with prefix hits served from pinned pages; its allocator stays consistent."""
    config = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32)
    params = llama.init_params(config, jax.random.key(5), jnp.float32, scale=0.2)
    system = rng.integers(0, config.vocab_size, size=20).tolist()  # one full page of 16 and a partial one
    ps = [system] + [system + rng.integers(0, 96, size=n).tolist() for n in (1, 3, 4)]

    def run(cache, **kw):  # one bucket: one compiled step per engine (prompts go in chunks of 16)
        engine = Engine(params, config, max_len=64, cache=cache, verbose=False, buckets=(16,), **kw)
        for p in ps:
            engine.submit(p, SamplingParams(max_new_tokens=6))
        return [c.tokens for c in engine.run(show_progress=False)], engine

    want, _ = run("q8", num_slots=2)
    got, engine = run("q8-paged", num_slots=2, prefix_cache_bytes=1 << 20)
    assert got == want
    assert engine.stats.cached_prompt_tokens > 0  # later prompts shared the pinned pages of the first
    assert engine.cache.layout == "paged" and isinstance(engine.cache.format, jkv.Q8)
    assert_allocator_consistent(engine.cache)
    assert (np.asarray(engine.cache.refcounts) == np.asarray(engine.cache.pins)).all()  # only entries hold pages


# ---------------------------------------------------------------------- the real lowering
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The contract at several page sizes with the Triton lowering (the kernel's own table:
    tests/kernels/test_paged_q8_kernel.py)."""

    @pytest.mark.parametrize("page_size", [16, 32, 64])
    def test_paged_equals_contiguous_q8_kernel(self, rng, page_size):
        lengths = (1, 8 * page_size - 1, 3 * page_size + 5, 8 * page_size)
        assert contract(rng, page_size=page_size, lengths=lengths, head_dim=128, q_dtype=jnp.bfloat16) < 1e-2
