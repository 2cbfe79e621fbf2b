"""The Q8 format in a contiguous cache: every cache operation bit-exact on codes and scales, byte ratios,
re-storing other formats, errors, and attention through a Q8 cache against float64 references (the format's
own round trip: test_formats.py)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import Q8_ATTENTION_REL_TOL
from reference import attention_f64, decode_attention_f64

import jkv
from jkv import memory
from jkv.caches import ERR_BAD_SLOT, ERR_WRITE_OVERFLOW
from jkv.caches.formats import BLOCK, dequantize, quantize
from pallas_kernels import backend
from pallas_kernels.formats import hadamard

SPEC = jkv.CacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, max_len=16, dtype=jnp.float32)
SCALE_DTYPES = [jnp.float16, jnp.float32]
sname = lambda d: jnp.dtype(d).name


def blocky(rng, shape, outliers=True):
    """Random values whose 32-blocks span magnitudes 1e-3..1e3, with rare 100x outliers (as K rows have)."""
    x = rng.standard_normal(shape)
    x *= 10.0 ** rng.uniform(-3, 3, (*shape[:-1], shape[-1] // BLOCK, 1)).repeat(BLOCK, -1).reshape(shape)
    if outliers:
        x *= np.where(rng.random(shape) < 0.01, 100.0, 1.0)
    return x


def within_format(deq, x, scales, rotated):
    """``deq`` is within the Q8 bound of ``x``: half a step per value, or (rotated) per vector in L2 norm (the
    rotation is orthonormal, so the error vector keeps its length: at most sqrt(Σ 32 (step / 2)²))."""
    deq, x = np.asarray(deq, np.float64), np.asarray(x, np.float64)
    step = np.asarray(scales, np.float64)
    if not rotated:
        return bool((np.abs(deq - x) <= step.repeat(BLOCK, -1) / 2 * (1 + 2**-14)).all())
    bound = np.sqrt(np.sum(BLOCK * (step / 2) ** 2, -1)) * (1 + 2**-14)
    slack = 1e-6 * np.linalg.norm(x, axis=-1)  # float32 rounding of the two rotations
    return bool((np.linalg.norm(deq - x, axis=-1) <= bound + slack).all())


# Jitted as it runs inside a write (eagerly, each butterfly stage's operations would compile one by one).
_hadamard = jax.jit(hadamard)


def codes_of(x, rotated, scale_dtype=jnp.float16):
    """What a cache stores for values ``x``: the codes of x, or of hadamard(x) when rotated."""
    return quantize(_hadamard(x) if rotated else x, scale_dtype=scale_dtype)


NAMES = ("k", "k_scale", "v", "v_scale")


# ---------------------------------------------------------------------- cache
# Cache operations jitted once per shape (the eager host path and its errors: test_cache_errors_eager).
_insert = jax.jit(lambda c, slot, single: c.insert_into_slot(slot, single))
_extract = jax.jit(lambda c, slot, max_len: c.extract_slot(slot, max_len), static_argnums=2)
_with_format = jax.jit(lambda c, fmt: c.with_format(fmt), static_argnums=1)
_layer = jax.jit(lambda c, layer: c.layer(layer, jnp.float32), static_argnums=1)
_begin_write = jax.jit(lambda c, t, layer, k, v: c.begin(t).write(layer, k, v), static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnames=("spec", "fmt"))
def _quantized(k, v, lengths, spec, fmt):
    zeros = jnp.zeros_like(lengths)
    plain = jkv.KVCache(
        (k, v), lengths, zeros, zeros, spec=spec.replace(dtype=jnp.float32), format=jkv.Plain(jnp.float32)
    )
    cache = plain.with_format(fmt)
    unused = jnp.arange(spec.max_len)[None, :] >= lengths[:, None]  # (B, S)
    poison = lambda s: jnp.where(unused[None, :, None, :, None], jnp.nan, s).astype(s.dtype)
    kq, ks, vq, vs = cache.data
    return cache.replace(data=(kq, poison(ks), vq, poison(vs)), spec=spec)


def filled(rng, lengths, spec=SPEC, scale_dtype=jnp.float16, rotated=True):
    """A Q8 cache whose sequence b holds lengths[b] random positions in every layer, the original float32
    values, and NaN scales in every unused position (so that reading one shows up)."""
    lengths = np.asarray(lengths)
    shape = (spec.num_layers, len(lengths), spec.num_kv_heads, spec.max_len, spec.head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    fmt = jkv.Q8(scale_dtype=scale_dtype, rotated=rotated)
    return _quantized(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), spec, fmt), k, v


def np_q8(cache):
    """The cache's codes, scales, lengths and errors as NumPy, for bit-exact comparisons."""
    out = {name: np.array(x) for name, x in zip(NAMES, cache.data, strict=True)}
    return out | {"lengths": np.array(cache.lengths), "errors": np.array(cache.errors)}


def assert_q8_equal(a, b, keep=None):
    """Codes, scales, lengths and errors equal (the first ``keep`` positions of the codes and scales)."""
    want = np_q8(b)
    for name, x in np_q8(a).items():
        cut = (lambda y: y[:, :, :, :keep]) if keep is not None and name not in ("lengths", "errors") else np.asarray
        np.testing.assert_array_equal(cut(x), cut(want[name]), err_msg=name)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=sname)
@pytest.mark.parametrize("head_dim", [32, 128])
def test_init_shapes_and_nbytes_ratios(dtype, scale_dtype, head_dim):
    spec = SPEC.replace(dtype=dtype, head_dim=head_dim, max_len=512)
    cache = jkv.KVCache.init(spec, 4, format=jkv.Q8(scale_dtype=scale_dtype))
    shape = (3, 4, 2, 512, head_dim)
    k, ks, v, vs = cache.data
    chex.assert_shape([k, v], shape)
    chex.assert_shape([ks, vs], (*shape[:-1], head_dim // 32))
    chex.assert_type([k, v], jnp.int8)
    chex.assert_type([ks, vs], scale_dtype)
    assert cache.spec == spec and cache.batch == 4 and cache.max_len == 512
    assert cache.format.scale_dtype == scale_dtype
    assert cache.nbytes == memory.bytes_per_token(spec, cache.format) * 4 * 512 + 3 * 4 * 4
    # Per 32 values: 32 code bytes + one scale, against 128 (float32) or 64 (bfloat16) bytes.
    per_block = 32 + jnp.dtype(scale_dtype).itemsize
    f32 = jkv.KVCache.init(spec.replace(dtype=jnp.float32), 4).nbytes
    bf16 = jkv.KVCache.init(spec.replace(dtype=jnp.bfloat16), 4).nbytes
    assert f32 / cache.nbytes == pytest.approx(128 / per_block, rel=1e-4)  # 3.76 (f16 scales) or 3.56 (f32)
    assert bf16 / cache.nbytes == pytest.approx(64 / per_block, rel=1e-4)  # 1.88 or 1.78


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("t", [1, 3, 16])
def test_write_quantizes_only_the_new_positions(rng, t, scale_dtype, rotated):
    lengths = np.array([0, min(5, 16 - t), 16 - t, min(2, 16 - t)])
    cache, _, _ = filled(rng, lengths, scale_dtype=scale_dtype, rotated=rotated)
    before = np_q8(cache)
    k_new = jnp.asarray(blocky(rng, (4, 2, t, 64)), jnp.float32)
    v_new = jnp.asarray(blocky(rng, (4, 2, t, 64)), jnp.float32)
    out = _begin_write(cache, t, 1, k_new, v_new)
    kq, ks = codes_of(k_new, rotated, scale_dtype)
    vq, vs = codes_of(v_new, rotated, scale_dtype)
    want = before
    want["errors"] = np.zeros(4, np.int32)
    for b, n in enumerate(lengths):
        for name, new in zip(NAMES, (kq, ks, vq, vs), strict=True):
            want[name][1, b, :, n : n + t] = np.asarray(new[b])
    written = np.zeros(cache.data[0].shape[:4], bool)  # (L, B, K, S)
    for b, n in enumerate(lengths):
        written[1, b, :, n : n + t] = True
    for name, x in np_q8(out).items():
        if not rotated or name in ("lengths", "errors"):
            np.testing.assert_array_equal(x, want[name], err_msg=name)
            continue
        # Other positions and layers untouched; the new ones as codes_of computes them, up to the float32 sums
        # of the rotation, which may round differently inside the jitted write: a code may move by one at a
        # rounding boundary, a scale by one float16 step.
        np.testing.assert_array_equal(x[~written], want[name][~written], err_msg=name)
        tol = {"atol": 1, "rtol": 0} if name in ("k", "v") else {"atol": 0, "rtol": 2**-9}
        np.testing.assert_allclose(x[written], want[name][written], err_msg=name, **tol)
    k, v = (np.asarray(x) for x in _layer(out, 1))
    for b, n in enumerate(lengths):
        scales = np.asarray(out.data[1])[1, b, :, n : n + t]
        assert within_format(k[b, :, n : n + t], k_new[b], scales, rotated)
        assert np.isfinite(v[b, :, n : n + t]).all()


@pytest.mark.parametrize("single_len", [1, 16])
@pytest.mark.parametrize("slot", [0, 3])
def test_insert_into_slot_and_extract_bit_exact(rng, slot, single_len):
    cache, _, _ = filled(rng, [2, 9, 4, 11])
    single, _, _ = filled(rng, [single_len], SPEC.replace(max_len=single_len))
    out = _insert(cache, slot, single)
    want = np_q8(cache)
    for name, x in np_q8(single).items():
        if name in ("lengths", "errors"):
            want[name][slot] = x[0]
        else:
            want[name][:, slot, :, :single_len] = x[:, 0]
    for name, x in np_q8(out).items():
        np.testing.assert_array_equal(x, want[name], err_msg=name)
    back = _extract(out, slot, single_len)
    assert back.spec == single.spec and back.format == single.format
    assert_q8_equal(back, single)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("trim", [True, False])
def test_snapshot_restore_bit_exact(rng, scale_dtype, trim):
    rotated = scale_dtype == jnp.float16  # both bases, both scale dtypes
    cache, _, _ = filled(rng, [3, 0, 7], SPEC.replace(dtype=jnp.bfloat16), scale_dtype=scale_dtype, rotated=rotated)
    cache = cache.replace(errors=jnp.array([0, ERR_WRITE_OVERFLOW, 0], jnp.int32))
    snap = cache.snapshot(trim=trim)
    keep = 7 if trim else 16
    assert isinstance(snap.data[0], np.ndarray) and snap.data[0].shape[3] == keep
    assert snap.data[1].dtype == scale_dtype
    back = jkv.KVCache.restore(snap)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, cache)
    assert back.spec == cache.spec and back.format == cache.format
    assert_q8_equal(back, cache, keep)  # NaN scales of unused positions compare equal too
    bigger = jkv.KVCache.restore(snap, max_len=32)
    assert bigger.max_len == 32
    assert_q8_equal(bigger, cache, keep)


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
def test_with_format_dequantizes_the_whole_cache(rng, rotated):
    cache, k, _ = filled(rng, [16, 16, 16], SPEC.replace(dtype=jnp.bfloat16), rotated=rotated)
    assert cache.format.rotated == rotated
    full = _with_format(cache, jkv.Plain())
    assert full.spec == cache.spec and full.format == jkv.Plain(jnp.bfloat16)
    chex.assert_type(full.data[0], jnp.bfloat16)
    full32 = _with_format(cache.replace(spec=cache.spec.replace(dtype=jnp.float32)), jkv.Plain())
    assert within_format(full32.data[0], k, cache.data[1], rotated)
    v = dequantize(cache.data[2], cache.data[3])
    np.testing.assert_array_equal(np.asarray(full32.data[1]), np.asarray(_hadamard(v) if rotated else v))
    layer_k, layer_v = _layer(cache, 1)
    np.testing.assert_array_equal(np.asarray(layer_k), np.asarray(full32.data[0][1]))
    np.testing.assert_array_equal(np.asarray(layer_v), np.asarray(full32.data[1][1]))
    np.testing.assert_array_equal(np.asarray(full.lengths), [16, 16, 16])


def test_cache_errors_eager(rng):
    cache, _, _ = filled(rng, [14, 2])
    k3 = jnp.asarray(rng.standard_normal((2, 2, 3, 64)), jnp.float32)
    one = lambda **kw: jkv.KVCache.init(SPEC.replace(**kw), 1, format=jkv.Q8())
    cases = [
        (lambda: one(head_dim=48), ValueError, "head_dim=48 must be a multiple of 32"),
        (lambda: jkv.Q8(scale_dtype=jnp.int8), TypeError, "float16 or float32, got int8"),
        (lambda: jkv.Q8(rotated="yes"), TypeError, "rotated must be a bool, got 'yes'"),
        (lambda: jkv.KVCache.init(SPEC, 1, format="q8"), TypeError, "format must be a jkv.caches.formats.Format"),
        (lambda: cache.begin(3), ValueError, "max_len=16"),
        (lambda: cache.write(0, k3, k3[:, :, :2]), ValueError, "must match"),
        (lambda: cache.write(0, k3[..., :32], k3[..., :32]), ValueError, "D=64"),
        (lambda: cache.write(3, k3[:, :, :1], k3[:, :, :1]), ValueError, "layer=3 out of range"),
        (lambda: cache.layer(5), ValueError, "layer=5 out of range"),
        (lambda: cache.insert_into_slot(0, "x"), TypeError, "must be a jkv.KVCache"),
        (lambda: cache.insert_into_slot(0, one(head_dim=32)), ValueError, "head_dim=32"),
        (lambda: cache.insert_into_slot(0, one(dtype=jnp.bfloat16)), ValueError, "dtype=bfloat16"),
        (lambda: cache.insert_into_slot(0, jkv.KVCache.init(SPEC, 2, format=jkv.Q8())), ValueError, "batch=2"),
        (lambda: cache.insert_into_slot(0, one(max_len=17)), ValueError, "max_len=17 exceeds"),
        (lambda: cache.insert_into_slot(2, one()), ValueError, "slot=2 out of range"),
        (lambda: cache.extract_slot(0, max_len=40), ValueError, "max_len=40"),
        (lambda: jkv.KVCache.restore(cache.snapshot(), max_len=8), ValueError, "max_len=8"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 2])


def test_slots_of_another_storage_are_re_stored(rng):
    """A float cache, or Q8 codes of another scale dtype or basis, inserted into a Q8 cache are re-quantized into
    this cache's format (what used to be refused): the slot holds this format's codes of their values."""
    cache, _, _ = filled(rng, [14, 2])
    plain, _, _ = filled(rng, [5], SPEC.replace(max_len=8))
    plain = _with_format(plain, jkv.Plain())
    out = _insert(cache, 1, plain)
    want = _with_format(plain, cache.format)
    for got, w in zip(out.data, want.data, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32)[:, 1, :, :5], np.asarray(w, np.float32)[:, 0, :, :5],
                                   atol=1, rtol=2**-9)  # fmt: skip
    other = _with_format(plain, jkv.Q8(scale_dtype=jnp.float32, rotated=False))
    out = _insert(cache, 1, other)
    assert out.format == cache.format and int(out.lengths[1]) == 5


def test_errors_under_jit_flag_and_never_corrupt(rng):
    cache, _, _ = filled(rng, [14, 2])
    k3 = jnp.asarray(rng.standard_normal((2, 2, 3, 64)), jnp.float32)
    out = _begin_write(cache, 3, 0, k3, k3)
    np.testing.assert_array_equal(np.asarray(out.errors), [ERR_WRITE_OVERFLOW, 0])
    np.testing.assert_array_equal(np.asarray(out.data[0])[:, 0], np.asarray(cache.data[0])[:, 0])  # untouched
    np.testing.assert_array_equal(np.asarray(out.data[1])[:, 0], np.asarray(cache.data[1])[:, 0])
    got, want = np.asarray(out.data[0])[0, 1, :, 2:5], np.asarray(codes_of(k3[1], True)[0])
    assert np.abs(got.astype(int) - want).max() <= 1  # the rotation's float32 sums may round differently in jit
    with pytest.raises(RuntimeError, match="sequence 0: step past max_len"):
        out.check()
    bad = _insert(cache, 7, jkv.KVCache.init(SPEC, 1, format=jkv.Q8()))
    np.testing.assert_array_equal(np.asarray(bad.data[0]), np.asarray(cache.data[0]))
    np.testing.assert_array_equal(np.asarray(bad.lengths), [14, 2])
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()


# ---------------------------------------------------------------------- attention through a Q8 cache
_attend_xla = jax.jit(lambda q, c, layer: jkv.attend(q, c, layer, impl="xla"), static_argnums=2)


@functools.partial(jax.jit, static_argnames="impl")
def _decode_step(cache, k_new, q, impl):
    """A decode step: begin(1), layer 1 written (``k_new`` as keys and values), attention of ``q`` [B, 1, N, D]
    through layer 1; and layer 1's keys and values decoded as float32."""
    cache = cache.begin(1).write(1, k_new, k_new)
    return jkv.attend(q, cache, 1, impl=impl), cache.layer(1, jnp.float32)


ATTN_CASES = [  # (batch, kv_heads, group, head_dim, max_len, scale dtype)
    (3, 2, 4, 64, 200, jnp.float16),
    (3, 2, 4, 64, 200, jnp.float32),
    (2, 1, 8, 128, 96, jnp.float16),
    (4, 4, 1, 64, 40, jnp.float32),
]


@pytest.mark.parametrize(
    ("impl", "rotated"), [("xla", False), ("xla", True), ("pallas", True)], ids=["xla", "xla-rotated", "pallas-rotated"]
)
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "head_dim", "max_len", "scale_dtype"),
    ATTN_CASES,
    ids=[f"B{b}_K{k}_G{g}_D{d}_S{s}_{sname(sd)}" for b, k, g, d, s, sd in ATTN_CASES],
)
def test_decode_attention_q8(rng, batch, kv_heads, group, head_dim, max_len, scale_dtype, impl, rotated):
    """Through jkv.attend at T = 1 (the Pallas path: interpret mode off the GPU); a rotated cache attends in the
    rotated basis: equal to the reference over the decoded values, and within Q8's error of the unquantized."""
    spec = jkv.CacheSpec(2, kv_heads, head_dim, max_len, jnp.float32)
    lengths = rng.integers(1, max_len, batch)
    lengths[0] = max_len - 1  # attends to every position
    cache, k, v = filled(rng, lengths, spec, scale_dtype, rotated)
    k_new = rng.standard_normal((batch, kv_heads, 1, head_dim)).astype(np.float32)
    k[1, np.arange(batch), :, lengths] = k_new[:, :, 0]
    v[1, np.arange(batch), :, lengths] = k_new[:, :, 0]
    q = jnp.asarray(rng.standard_normal((batch, 1, kv_heads * group, head_dim)), jnp.float32)
    out, layer = _decode_step(cache, jnp.asarray(k_new), q, impl)
    out = out[:, 0]
    chex.assert_shape(out, (batch, kv_heads * group, head_dim))
    chex.assert_type(out, jnp.float32)
    q = q[:, 0]
    deq_k, deq_v = (np.asarray(x, np.float64) for x in layer)
    # Equal to "dequantize, then attend" to float32 rounding ...
    ref_q8 = decode_attention_f64(q, deq_k, deq_v, lengths + 1)
    tol = 10 * REL_TOL["float32"] if impl == "xla" else 2e-3 if backend.gpu_backend() == backend.TRITON else 2e-5
    assert rel_err(out, ref_q8) < tol
    # ... and within the measured Q8 error of attention over the unquantized values.
    err = rel_err(out, decode_attention_f64(q, k[1], v[1], lengths + 1))
    assert 1e-4 < err < Q8_ATTENTION_REL_TOL, err


def test_prefill_attention_q8_xla(rng):
    cache, _, _ = filled(rng, [5, 0, 9])
    t = 4
    k_new = jnp.asarray(rng.standard_normal((3, 2, t, 64)), jnp.float32)
    cache = _begin_write(cache, t, 2, k_new, -k_new)
    q = jnp.asarray(rng.standard_normal((3, t, 4, 64)), jnp.float32)
    out = _attend_xla(q, cache, 2)
    deq_k, deq_v = _layer(cache, 2)
    positions = np.array([5, 0, 9])[:, None] + np.arange(t)
    assert rel_err(out, attention_f64(q, deq_k, deq_v, positions)) < 10 * REL_TOL["float32"]
    with pytest.raises(TypeError, match="cache must be a jkv cache, got dict"):
        jkv.attend(q, {}, 0)
