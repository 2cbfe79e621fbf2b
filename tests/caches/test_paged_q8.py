"""Q8 pages (jkv.Q8PagedKVCache and the paged Q8 kernel) against the contiguous Q8KVCache on the same data.

Quantization is per vector, so the same writes give the same codes and scales wherever a position lives: every
operation is compared *exactly* (codes and scales of the valid positions) with a ``Q8KVCache`` that received the
same writes. Attention through the pages (XLA reference and Pallas kernel) must equal attention over the
contiguous Q8 cache holding the same logical contents, on randomly permuted pages with NaN scales in every page
and row no sequence uses; the kernel also against NumPy float64 over the dequantized values.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from jkv.cache import ERR_BAD_SLOT, ERR_WRITE_OVERFLOW
from jkv.paged import NO_PAGE
from jkv.quant import dequantize, quantize
from reference import attention_f64, decode_attention_f64
from test_paged_kernel import random_paged
from test_q8_kernel import INT8_KERNEL_TOL, KERNEL_TOL

import jkv
from jkv.engine import Engine, SamplingParams
from jkv.models import llama
from pallas_kernels import backend
from pallas_kernels import paged_attention as paged

ON_GPU = backend.gpu_backend() == backend.TRITON
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, max_len=32, dtype=jnp.float32)
PAGE = 8

_write = jax.jit(lambda c, layer, k, v: c.write(layer, k, v))
_advance = jax.jit(lambda c, n: c.advance(n))
_rollback = jax.jit(lambda c, n: c.rollback(n))
_reset_slot = jax.jit(lambda c, i: c.reset_slot(i))
_fork = jax.jit(lambda c, src, dst: c.fork(src, dst))
_insert = jax.jit(lambda c, i, single: c.insert_into_slot(i, single))
_insert_shared = jax.jit(lambda c, i, single, pages, n: c.insert_into_slot(i, single, prefix=(pages, n)))
_pin = jax.jit(lambda c, i, n: c.pin(i, n))
_unpin = jax.jit(lambda c, pages: c.unpin(pages))
_flat = jax.jit(lambda c: c.to_contiguous())


def rand_kv(rng, batch, t):
    shape = (batch, SPEC.num_kv_heads, t, SPEC.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))


def valid(cache, b):
    """Codes and scales of K and V at the valid positions of sequence ``b`` (paged or contiguous Q8)."""
    flat = _flat(cache) if isinstance(cache, jkv.Q8PagedKVCache) else cache
    n = int(cache.lengths[b])
    return [np.asarray(x[:, b, :, :n]) for x in (flat.k, flat.k_scale, flat.v, flat.v_scale)]


def assert_same_contents(paged_cache, ref):
    np.testing.assert_array_equal(np.asarray(paged_cache.lengths), np.asarray(ref.lengths))
    for b in range(ref.batch):
        for got, want in zip(valid(paged_cache, b), valid(ref, b), strict=True):
            np.testing.assert_array_equal(got, want)


def assert_allocator_consistent(cache):
    tables = np.asarray(cache.block_tables)
    hist = np.bincount(tables[tables >= 0], minlength=cache.num_pages)
    np.testing.assert_array_equal(np.asarray(cache.refcounts), hist + np.asarray(cache.pins))


def step_both(rng, paged_cache, ref, t, advance=None):
    for layer in range(SPEC.num_layers):
        k, v = rand_kv(rng, ref.batch, t)
        paged_cache, ref = _write(paged_cache, layer, k, v), _write(ref, layer, k, v)
    n = jnp.full(ref.batch, t, jnp.int32) if advance is None else jnp.asarray(advance, jnp.int32)
    paged_cache, ref = _advance(paged_cache, n), _advance(ref, n)
    assert not np.asarray(paged_cache.errors).any() and not np.asarray(ref.errors).any()
    return paged_cache, ref


def new_pair(batch, num_pages):
    return jkv.Q8PagedKVCache.init(SPEC, batch, page_size=PAGE, num_pages=num_pages), jkv.Q8KVCache.init(SPEC, batch)


# ---------------------------------------------------------------------- construction
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_init_shapes_and_nbytes(scale_dtype):
    cache = jkv.Q8PagedKVCache.init(
        SPEC.replace(dtype=jnp.bfloat16), 3, page_size=PAGE, num_pages=5, scale_dtype=scale_dtype
    )
    chex.assert_shape([cache.k_pages, cache.v_pages], (2, 5, 2, PAGE, 32))
    chex.assert_shape([cache.k_scale_pages, cache.v_scale_pages], (2, 5, 2, PAGE, 1))
    assert cache.k_pages.dtype == jnp.int8 and cache.scale_dtype == jnp.dtype(scale_dtype)
    assert cache.spec == SPEC.replace(dtype=jnp.bfloat16)
    assert (np.asarray(cache.block_tables) == NO_PAGE).all() and int(cache.num_free_pages()) == 5
    pools = 2 * 2 * 5 * 2 * PAGE * (32 + jnp.dtype(scale_dtype).itemsize)
    assert cache.nbytes == pools + 4 * (3 * 4 + 5 + 5 + 3 + 3)  # tables, counts, pins, lengths, errors


# ---------------------------------------------------------------------- operations against the Q8KVCache
def test_ops_match_q8_cache_on_a_fragmented_pool(rng):
    """Writes across page boundaries, ragged advance, reset_slot and rollback on a fragmented pool; then insert
    (a Q8KVCache as it is, a float KVCache quantized), extract_slot, snapshot / restore, from_contiguous."""
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

    single = jkv.Q8KVCache.init(SPEC.replace(max_len=20), 1)
    k, v = rand_kv(rng, 1, 17)
    for layer in range(SPEC.num_layers):
        single = single.write(layer, k, v)
    single = single.advance(17)
    paged_cache, ref = _insert(paged_cache, 1, single), _insert(ref, 1, single)
    assert_same_contents(paged_cache, ref)
    flat = single.dequantize()  # a float KVCache: quantized on the way in, to the same codes
    chex.assert_trees_all_equal(_flat(_insert(paged_cache, 1, flat)).k, _flat(paged_cache).k)
    assert_allocator_consistent(paged_cache)

    for slot, max_len in ((1, None), (3, 12)):
        got, want = paged_cache.extract_slot(slot, max_len), ref.extract_slot(slot, max_len)
        assert isinstance(got, jkv.Q8KVCache) and got.k.shape == want.k.shape
        assert_same_contents(got, want)
    deq, want = paged_cache.dequantize(), ref.dequantize()
    for b, n in enumerate(np.asarray(ref.lengths)):
        np.testing.assert_array_equal(np.asarray(deq.k[:, b, :, :n]), np.asarray(want.k[:, b, :, :n]))

    snap = paged_cache.snapshot()
    assert isinstance(snap, jkv.Q8Snapshot) and snap.k.shape[3] == 20
    restored = jkv.Q8PagedKVCache.restore(snap, page_size=4, num_pages=20)
    assert (restored.page_size, restored.num_pages, restored.scale_dtype) == (4, 20, jnp.float16)
    assert_same_contents(restored, ref)  # through from_contiguous(Q8KVCache.restore(snap))


def test_fork_copy_on_write_pin_and_shared_insert(rng):
    paged_cache, ref = new_pair(4, 16)
    for _ in range(2):  # sequence 0: one full page and 6 positions of the next
        paged_cache, ref = step_both(rng, paged_cache, ref, 7, advance=[7, 0, 0, 0])
    forked, ref_f = _fork(paged_cache, 0, 2), _insert(ref, 2, ref.extract_slot(0))
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
    read = pinned.read_pinned(pages[:2], 10)
    assert isinstance(read, jkv.Q8KVCache) and read.max_len == 2 * PAGE and int(read.lengths[0]) == 10
    np.testing.assert_array_equal(np.asarray(read.k_scale[:, 0, :, :10]), codes0[1][:, :, :10])
    single = jkv.Q8KVCache.init(SPEC, 1).insert_into_slot(0, read)
    single, _ = step_both(rng, single, jkv.Q8KVCache.init(SPEC, 1).insert_into_slot(0, read), 7)
    admitted, ref = _insert_shared(pinned, 1, single, pages, 10), _insert(ref, 1, single)
    assert_same_contents(admitted, ref)
    after = np.asarray(admitted.block_tables)[1]
    assert after[0] == row[0] and after[1] not in row[:2]  # full page shared, partial one copied
    for got, want in zip(valid(admitted.read_pinned(pages[:2], 14), 0), codes0, strict=True):
        np.testing.assert_array_equal(got, want)  # the pinned pages kept their contents
    freed = _unpin(admitted, pages)
    assert_allocator_consistent(freed)
    assert_same_contents(freed, ref)


def test_errors(rng):
    paged_cache, ref = new_pair(4, 16)
    for _ in range(4):
        paged_cache, ref = step_both(rng, paged_cache, ref, 7)  # lengths 28
    k3, v3 = rand_kv(rng, 4, 5)
    one = jkv.Q8KVCache.init(SPEC, 1)
    cases = [
        (lambda: jkv.Q8PagedKVCache.init(SPEC.replace(head_dim=16), 1, page_size=8), ValueError, "multiple of 32"),
        (lambda: jkv.Q8PagedKVCache.init(SPEC, 1, page_size=8, scale_dtype=jnp.int8), TypeError, "scale_dtype"),
        (lambda: paged_cache.write(0, k3, v3), ValueError, "write of T=5 positions past max_len=32"),
        (lambda: paged_cache.insert_into_slot(0, "x"), TypeError, "single must be a Q8KVCache or a KVCache"),
        (
            lambda: paged_cache.insert_into_slot(0, jkv.Q8KVCache.init(SPEC, 1, scale_dtype=jnp.float32)),
            ValueError,
            "scale_dtype=float32, expected float16",
        ),
        (
            lambda: paged_cache.insert_into_slot(0, jkv.Q8KVCache.init(SPEC, 1, rotated=False)),
            ValueError,
            "rotated=False, expected True",
        ),
        (
            lambda: paged_cache.insert_into_slot(0, jkv.Q8KVCache.init(SPEC.replace(num_kv_heads=1), 1)),
            ValueError,
            "num_kv_heads",
        ),
        (lambda: paged_cache.insert_into_slot(4, one), ValueError, "slot=4"),
        (lambda: jkv.Q8PagedKVCache.from_contiguous("x", page_size=8), TypeError, "cache must be a Q8KVCache"),
        (
            lambda: jkv.Q8PagedKVCache.restore(jkv.KVCache.init(SPEC, 1).snapshot(), page_size=8),
            TypeError,
            "snap must be a Q8Snapshot",
        ),
        (lambda: jkv.Q8PagedKVCache.from_contiguous(ref, page_size=8, num_pages=15), ValueError, "need 16"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    over = jax.jit(lambda c, k, v: c.write(0, k, v))(paged_cache, k3, v3)
    np.testing.assert_array_equal(np.asarray(over.errors), [ERR_WRITE_OVERFLOW] * 4)
    chex.assert_trees_all_equal(over.k_scale_pages, paged_cache.k_scale_pages)
    bad = jax.jit(lambda c, i: c.fork(i, 0))(paged_cache, 5)
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()


def test_donated_steps_run_in_place(rng):
    """A jitted write-every-layer + advance step, fork/rollback/reset_slot and insert alias the donated pools
    (codes and scales) and allocate no copy of them."""
    spec = jkv.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=128, max_len=1024, dtype=jnp.float32)
    cache = jkv.Q8PagedKVCache.init(spec, 8, page_size=16)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 1, 128)), jnp.float32)
    pools = sum(x.nbytes for x in (cache.k_pages, cache.v_pages, cache.k_scale_pages, cache.v_scale_pages))

    def step(c, k):
        for layer in range(spec.num_layers):
            c = c.write(layer, k, k)
        return c.advance(1)

    ops = [
        (step, (cache, k_new)),
        (lambda c: c.fork(0, 1).rollback(c.lengths).reset_slot(2), (cache,)),
        (lambda c, s: c.insert_into_slot(3, s), (cache, jkv.Q8KVCache.init(spec.replace(max_len=128), 1))),
    ]
    for fn, args in ops:
        stats = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
        assert stats.alias_size_in_bytes >= pools, stats
        assert stats.temp_size_in_bytes < cache.k_pages.nbytes // 16, stats


# ---------------------------------------------------------------------- attention
def q8_pools(rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, stale, scale_dtype=jnp.float16):
    """test_paged_kernel's random permuted pools quantized: codes 0 and NaN scales wherever nothing valid lives.
    Returns the four pools, the tables and the dequantized contiguous K/V slabs (float64)."""
    k_pages, v_pages, tables, slabs = random_paged(
        rng, batch, kv_heads, head_dim, page_size, max_pages, lengths, layers, stale
    )
    pools = [*quantize(jnp.asarray(k_pages, jnp.float32), scale_dtype=scale_dtype)]
    pools += [*quantize(jnp.asarray(v_pages, jnp.float32), scale_dtype=scale_dtype)]
    deq = [
        np.asarray(dequantize(*quantize(jnp.asarray(s, jnp.float32), scale_dtype=scale_dtype)), np.float64)
        for s in slabs
    ]
    return pools, tables, deq


def cache_of(pools, tables, lengths, dtype=jnp.float32):
    k, k_scale, v, v_scale = pools
    num_pages = k.shape[1]
    return jkv.Q8PagedKVCache(
        k_pages=k,
        v_pages=v,
        k_scale_pages=k_scale,
        v_scale_pages=v_scale,
        block_tables=jnp.asarray(tables),
        refcounts=jnp.zeros(num_pages, jnp.int32),  # not used by attention
        pins=jnp.zeros(num_pages, jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32),
        errors=jnp.zeros(len(lengths), jnp.int32),
        dtype=jnp.dtype(dtype),
    )


def contract(rng, *, lengths=(1, 40, 97, 128), page_size=16, head_dim=64, q_dtype=jnp.float32, impl="pallas"):
    """The seeds' contract for Q8 pages: the relative difference between ``jkv.decode_attention`` on a
    Q8PagedKVCache (permuted pages, NaN scales wherever unused, stale table entries) and on the same logical
    contents as a contiguous Q8KVCache."""
    pools, tables, _ = q8_pools(rng, len(lengths), 2, head_dim, page_size, 8, lengths, (2, 1), True)
    cache = cache_of(pools, tables, np.asarray(lengths) - 1)  # decode attends to lengths + 1
    flat = cache.to_contiguous()
    assert isinstance(flat, jkv.Q8KVCache)
    q = jnp.asarray(rng.standard_normal((len(lengths), 8, head_dim)), q_dtype)
    got = jkv.decode_attention(q, cache, 1, impl=impl)
    want = jkv.decode_attention(q, flat, 1, impl=impl)
    assert got.shape == q.shape and got.dtype == q.dtype
    return rel_err(got.astype(jnp.float32), want.astype(jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_paged_equals_contiguous_q8(rng, impl):
    """XLA path: the same dequantized values in the same order (bit-equal); the kernel: the same block of keys
    as the contiguous Q8 kernel (4 pages of 16 = 64 keys), so equal to float32 rounding."""
    assert contract(rng, impl=impl) < (1e-7 if impl == "xla" else 1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_rotated_pages_attend_like_rotated_slots(rng, impl):
    """Pages and slots made by ``init`` are both rotated (jkv.quant): the same writes give the same codes, and
    decode attention (the Pallas path rotating q and the output around the paged kernel) equals the contiguous
    cache's and float64 attention over the rotated-back values."""
    paged_cache, ref = new_pair(3, 12)
    assert paged_cache.rotated and ref.rotated
    paged_cache, ref = step_both(rng, paged_cache, ref, 5)
    paged_cache, ref = step_both(rng, paged_cache, ref, 1, advance=[1, 0, 1])  # ragged
    assert_same_contents(paged_cache, ref)
    flat = _flat(paged_cache)
    assert flat.rotated
    q = jnp.asarray(rng.standard_normal((3, 4, SPEC.head_dim)), jnp.float32)
    got = jkv.decode_attention(q, paged_cache, 1, impl=impl)
    assert rel_err(got, jkv.decode_attention(q, ref, 1, impl=impl)) < 1e-6
    full = paged_cache.dequantize(jnp.float32)
    want = decode_attention_f64(q, full.k[1], full.v[1], np.asarray(paged_cache.lengths) + 1)
    assert rel_err(got, want) < KERNEL_TOL["float32-gpu" if ON_GPU and impl == "pallas" else "float32"]


def test_prefill_attention_matches_float64(rng):
    attended = np.array([9, 32, 17])
    pools, tables, (k, v) = q8_pools(rng, 3, 2, 32, PAGE, 4, attended, (2, 1), True)
    t = 2  # prefill of the last T written tokens: query t sits at lengths + t
    cache = cache_of(pools, tables, attended - t)
    q = rng.standard_normal((3, t, 4, 32))
    out = jax.jit(lambda q, c: jkv.prefill_attention(q, c, 1))(jnp.asarray(q, jnp.float32), cache)
    positions = (attended - t)[:, None] + np.arange(t)[None, :]
    assert rel_err(out, attention_f64(q, k, v, positions)) < REL_TOL["float32"]


# (id, batch, kv_heads, group, head_dim, page_size, max_pages, q dtype, lengths, layers, pages_per_block, splits,
#  fuse, gather). Lengths relative to the block bk = ppb * page_size and the capacity S.
CASES = [
    ("g4_d128_bf16_ps16_wide_splits2", 3, 2, 4, 128, 16, 8, "bfloat16", (63, 65, 128), (2, 1), None, 2, None, None),
    ("g1_d64_f32_ps8_ppb4_traced", 2, 2, 1, 64, 8, 6, "float32", (1, 48), (2, "traced"), 4, 3, None, None),
    ("g8_d64_f16_ps32_pages", 2, 1, 8, 64, 32, 3, "float16", (96, 33), None, None, 1, None, "pages"),
    ("g2_d128_bf16_ps64_tiles", 2, 2, 2, 128, 64, 2, "bfloat16", (0, 100), None, None, 2, "tiles", None),
    ("g4_d64_bf16_ps16_int8", 2, 2, 4, 64, 16, 4, "bfloat16", (64, 7), None, None, None, "int8", None),
]
IDS = [c[0] for c in CASES]


def run_case(rng, case, *, scale_up=1, interpret=None):
    _, batch, kv_heads, group, head_dim, ps, max_pages, dtype, lengths, layers, ppb, splits, fuse, gather = case
    dtype, max_pages = jnp.dtype(dtype), max_pages * scale_up
    lengths = np.array([min(n * scale_up, max_pages * ps) for n in lengths], np.int32)
    pools, tables, (k, v) = q8_pools(rng, batch, kv_heads, head_dim, ps, max_pages, lengths, layers, True)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    options = dict(
        interpret=interpret, pages_per_block=ppb, num_splits=splits, fuse=fuse, gather=gather, poison=True
    )  # fmt: skip
    args = (q, *pools, jnp.asarray(tables), jnp.asarray(lengths))
    if layers is None:
        out = paged.paged_q8_decode_attention(*args, **options)
    elif layers[1] == "traced":
        out = jax.jit(lambda *a: paged.paged_q8_decode_attention(*a[:-1], layer=a[-1], **options))(*args, jnp.int32(1))
    else:
        out = paged.paged_q8_decode_attention(*args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    ref = decode_attention_f64(np.asarray(q.astype(jnp.float32), np.float64), k, v, lengths)
    tol = KERNEL_TOL[dtype.name + ("-gpu" if dtype == jnp.float32 and jax.default_backend() == "gpu" else "")]
    assert rel_err(out, ref) < (INT8_KERNEL_TOL if fuse == "int8" else tol), lengths
    if layers is None:  # the module's own reference, on the same pools
        assert rel_err(out, paged.paged_q8_decode_attention_reference(*args).astype(jnp.float32)) < max(tol, 2e-2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


@pytest.mark.parametrize("page_size,expected_ppb", [(4, 16), (16, 4), (64, 1), (256, 1)], ids=str)
def test_config_counts_whole_pages(page_size, expected_ppb):
    """The default block is the contiguous Q8 kernel's 64 keys, rounded to whole pages."""
    config = paged.paged_q8_config(8, 8, 4096 // page_size, page_size, 128)
    assert config.pages_per_block == expected_ppb and config.num_splits >= 1 and not config.fused_combine


def test_kernel_errors():
    codes, scales = jnp.zeros((6, 2, 16, 64), jnp.int8), jnp.zeros((6, 2, 16, 2), jnp.float16)
    q, tables, lengths = jnp.zeros((2, 4, 64), jnp.float32), jnp.zeros((2, 3), jnp.int32), jnp.ones(2, jnp.int32)

    def call(**kw):
        pools = [kw.pop(name, x) for name, x in (("k", codes), ("ks", scales), ("v", codes), ("vs", scales))]
        return paged.paged_q8_decode_attention(kw.pop("q", q), *pools, kw.pop("t", tables), lengths, **kw)

    cases = [
        (dict(k=codes.astype(jnp.float32)), TypeError, "k_pages codes must be int8"),
        (dict(vs=scales.astype(jnp.bfloat16)), TypeError, "v_pages scales must be float16 or float32"),
        (dict(ks=jnp.zeros((6, 2, 16, 4), jnp.float16)), ValueError, "do not form a Q8 pair"),
        (dict(vs=scales.astype(jnp.float32)), ValueError, "same shape and scale dtype"),
        (dict(q=jnp.zeros((2, 3, 64))), ValueError, "num_q_heads=3 must be a multiple of num_kv_heads=2"),
        (dict(t=jnp.array([[6, 0, 0], [0, 0, 0]])), ValueError, "block_tables[0, 0]=6 must name a page"),
        (dict(layer=0), ValueError, "layer=0 needs pools of shape"),
        (dict(fuse="scores"), ValueError, "fuse='scores' is not one of ('tiles', 'wide', 'int8')"),
        (dict(gather="cols"), ValueError, "gather='cols' must be one of"),
        (dict(pages_per_block=3), ValueError, "pages_per_block=3 must be a power of two"),
        (dict(scale="x"), TypeError, "scale must be a Python number"),
    ]
    for kwargs, exc, text in cases:
        with pytest.raises(exc) as info:
            call(**kwargs)
        assert text in str(info.value), (text, str(info.value))


# ---------------------------------------------------------------------- the engine over Q8 pages
def test_engine_q8_pages_equal_q8_slots(rng):
    """The "q8-paged" engine gives the "q8" engine's tokens (the same codes, attended in the same order), also
    with prefix hits served from pinned pages; its allocator stays consistent."""
    config = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32)
    params = llama.init_params(config, jax.random.key(5), jnp.float32, scale=0.2)
    system = rng.integers(0, config.vocab_size, size=20).tolist()  # one full page of 16 and a partial one
    ps = [system] + [system + rng.integers(0, 96, size=n).tolist() for n in (1, 3, 4)]

    def run(cache, **kw):
        engine = Engine(params, config, max_len=64, cache=cache, verbose=False, **kw)
        for p in ps:
            engine.submit(p, SamplingParams(max_new_tokens=6))
        return [c.tokens for c in engine.run(show_progress=False)], engine

    want, _ = run("q8", num_slots=2)
    got, engine = run("q8-paged", num_slots=2, prefix_cache_bytes=1 << 20)
    assert got == want
    assert engine.stats.cached_prompt_tokens > 0  # later prompts shared the pinned pages of the first
    assert isinstance(engine.cache, jkv.Q8PagedKVCache)
    assert_allocator_consistent(engine.cache)
    assert (np.asarray(engine.cache.refcounts) == np.asarray(engine.cache.pins)).all()  # only entries hold pages


# ---------------------------------------------------------------------- the real lowering
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same table with the Triton lowering and 8x longer sequences; the contract at several page sizes."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=8, interpret=False)

    @pytest.mark.parametrize("page_size", [16, 32, 64])
    def test_paged_equals_contiguous_q8_kernel(self, rng, page_size):
        lengths = (1, 8 * page_size - 1, 3 * page_size + 5, 8 * page_size)
        assert contract(rng, page_size=page_size, lengths=lengths, head_dim=128, q_dtype=jnp.bfloat16) < 1e-2

    @pytest.mark.parametrize("batch,seq,page_size", [(1, 4096, 16), (8, 4096, 64)], ids=str)
    def test_bench_shapes_default_config(self, rng, batch, seq, page_size):
        """The benchmark's head layout (N=32, K=8, D=128, bf16 q) with the default launch parameters."""
        lengths = np.full((batch,), seq, np.int32)
        lengths[0] = seq - 77
        pools, tables, (k, v) = q8_pools(rng, batch, 8, 128, page_size, seq // page_size, lengths, None, True)
        q = jnp.asarray(rng.standard_normal((batch, 32, 128)), jnp.bfloat16)
        out = paged.paged_q8_decode_attention(
            q, *pools, jnp.asarray(tables), jnp.asarray(lengths), interpret=False, poison=True
        )
        ref = decode_attention_f64(np.asarray(q.astype(jnp.float32), np.float64), k, v, lengths)
        assert rel_err(out.astype(jnp.float32), ref) < KERNEL_TOL["bfloat16"]
