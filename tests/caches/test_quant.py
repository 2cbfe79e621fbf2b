"""Q8 format and Q8KVCache: round trip bound, every cache operation bit-exact on codes and scales, byte ratios,
errors, and attention through a Q8 cache against float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from jkv.cache import ERR_BAD_SLOT, ERR_WRITE_OVERFLOW
from jkv.quant import BLOCK, QMAX, Q8KVCache, dequantize, hadamard, hadamard_block, quantize
from reference import attention_f64, decode_attention_f64

import jkv
from jkv import quant
from pallas_kernels import backend

SPEC = jkv.CacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, max_len=16, dtype=jnp.float32)
SCALE_DTYPES = [jnp.float16, jnp.float32]
sname = lambda d: jnp.dtype(d).name

# Decode attention through a Q8 cache against attention over the unquantized values, q/k/v ~ N(0, 1): measured
# ‖out − ref‖ / ‖ref‖ of 7.2e-3 to 8.6e-3 over 1024 positions with either scale dtype (bf16 K/V: 2.3e-3 to
# 2.6e-3); docs/quant.md. Asserted at about twice the largest measured value.
Q8_ATTENTION_REL_TOL = 1.5e-2


def blocky(rng, shape, outliers=True):
    """Random values whose 32-blocks span magnitudes 1e-3..1e3, with rare 100x outliers (as K rows have)."""
    x = rng.standard_normal(shape)
    x *= 10.0 ** rng.uniform(-3, 3, (*shape[:-1], shape[-1] // BLOCK, 1)).repeat(BLOCK, -1).reshape(shape)
    if outliers:
        x *= np.where(rng.random(shape) < 0.01, 100.0, 1.0)
    return x


def check_scales(scales, x):
    """The stored scale is the tight one: max|x| / 127 to float32 rounding, or (float16) rounded up from it."""
    amax = np.abs(np.asarray(x, np.float64)).reshape(*x.shape[:-1], -1, BLOCK).max(-1)
    want, got = amax / QMAX, np.asarray(scales, np.float64)
    if scales.dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=2.5e-7)
    else:  # float16: at most one float16 step above (2**-10 relative, 2**-24 absolute among subnormals)
        assert (got >= want * (1 - 2.5e-7)).all() and (got <= want * (1 + 2**-10) + 2**-24).all()


# ---------------------------------------------------------------------- format
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=sname)
@pytest.mark.parametrize("shape", [(4, 32), (3, 5, 128), (2, 2, 7, 64)], ids=lambda s: "x".join(map(str, s)))
def test_round_trip_within_half_a_step(rng, scale_dtype, x_dtype, shape):
    # float16 inputs cannot hold the 1e5 outliers: their blocks span 1e-4..1e2.
    x = jnp.asarray(blocky(rng, shape) if x_dtype != jnp.float16 else blocky(rng, shape, False) / 10, x_dtype)
    values, scales = quantize(x, scale_dtype=scale_dtype)
    chex.assert_shape(values, shape)
    chex.assert_shape(scales, (*shape[:-1], shape[-1] // BLOCK))
    chex.assert_type(values, jnp.int8)
    chex.assert_type(scales, scale_dtype)
    xn = np.asarray(x, np.float64)
    s = np.asarray(scales, np.float64)
    check_scales(scales, xn)
    assert np.abs(np.asarray(values)).max() <= QMAX
    out = dequantize(values, scales)
    chex.assert_type(out, jnp.float32)
    err = np.abs(np.asarray(out, np.float64) - xn).reshape(*s.shape, BLOCK)
    bound = s[..., None] / 2 * (1 + 2**-14)  # half a step; slack: float32 rounding of x / scale (|code| <= 127)
    assert (err <= bound).all(), float((err / bound).max())
    # The bound is reached, not just respected: errors spread over the whole half step.
    assert (err / bound).max() > 0.9


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
def test_zero_tiny_and_dequantize_dtype(rng, scale_dtype):
    x = np.zeros((3, 64), np.float32)
    x[1, :32] = 1e-7 * rng.standard_normal(32)  # subnormal float16 scale
    x[2] = rng.standard_normal(64)
    values, scales = quantize(jnp.asarray(x), scale_dtype=scale_dtype)
    np.testing.assert_array_equal(np.asarray(values[0]), 0)
    np.testing.assert_array_equal(np.asarray(scales[0]), 0)
    out = np.asarray(dequantize(values, scales), np.float64)
    np.testing.assert_array_equal(out[0], 0)
    assert (np.abs(out - x).reshape(3, 2, BLOCK) <= np.asarray(scales, np.float64)[..., None] / 2 + 1e-30).all()
    bf = dequantize(values, scales, jnp.bfloat16)
    chex.assert_type(bf, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(bf), np.asarray(jnp.asarray(out, jnp.float32).astype(jnp.bfloat16)))


def test_format_errors():
    x = jnp.ones((2, 64), jnp.float32)
    v, s = quantize(x)
    cases = [
        (lambda: quantize(jnp.ones((2, 48))), ValueError, "multiple of 32"),
        (lambda: quantize(jnp.ones(())), ValueError, "multiple of 32"),
        (lambda: quantize(jnp.ones((2, 64), jnp.int32)), TypeError, "x must be a floating array, got int32"),
        (lambda: quantize(x, scale_dtype=jnp.bfloat16), TypeError, "float16 or float32, got bfloat16"),
        (lambda: quantize(x, scale_dtype="nope"), TypeError, "float16 or float32, got 'nope'"),
        (lambda: quantize(x * 1e7), ValueError, "beyond what a float16 scale can hold"),
        (lambda: dequantize(v.astype(jnp.int32), s), TypeError, "values must be int8, got int32"),
        (lambda: dequantize(v, s[:, :1]), ValueError, "do not form a Q8 pair"),
        (lambda: dequantize(v[:, :48], s), ValueError, "do not form a Q8 pair"),
        (lambda: jkv.quant.bytes_per_token(SPEC.replace(head_dim=40)), ValueError, "head_dim=40 must be a multiple"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    # float32 scales hold what float16 scales cannot.
    big = x * 1e7
    np.testing.assert_allclose(np.asarray(dequantize(*quantize(big, scale_dtype=jnp.float32))), np.asarray(big))


# ---------------------------------------------------------------------- rotation
def hadamard_f64(n):
    """The orthonormal Walsh-Hadamard matrix of size n (a power of two) from its closed form:
    H[i, j] = (-1) ** popcount(i & j) / sqrt(n)."""
    i = np.arange(n)
    bits = np.vectorize(lambda x: bin(x).count("1"))(i[:, None] & i[None, :])
    return (-1.0) ** bits / np.sqrt(n)


@pytest.mark.parametrize("impl", quant.HADAMARD_IMPLS)
@pytest.mark.parametrize("d,block", [(32, 32), (64, 64), (96, 32), (128, 128), (192, 64), (256, 256)])
def test_hadamard_is_the_orthonormal_block_matrix(rng, d, block, impl, monkeypatch):
    monkeypatch.setattr(quant, "HADAMARD_IMPL", impl)
    assert hadamard_block(d) == block
    x = rng.standard_normal((3, 5, d))
    want = x.reshape(3, 5, d // block, block) @ hadamard_f64(block)  # block diagonal
    got = hadamard(jnp.asarray(x, jnp.float32))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(np.asarray(got, np.float64), want.reshape(x.shape), atol=1e-5 * np.abs(x).max())
    # Its own inverse, and dot products (attention scores) are kept.
    np.testing.assert_allclose(np.asarray(hadamard(got)), x, atol=1e-5 * np.abs(x).max())
    y = rng.standard_normal((3, 5, d))
    dots = np.sum(np.asarray(got, np.float64) * np.asarray(hadamard(jnp.asarray(y, jnp.float32))), -1)
    np.testing.assert_allclose(dots, np.sum(x * y, -1), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(quant, "HADAMARD_IMPL", "fft")
    with pytest.raises(ValueError, match="HADAMARD_IMPL='fft' is not one of"):
        hadamard(got)


def test_rotation_spreads_outlier_channels(rng):
    """The reason for the rotation: with a few large channels (as keys have), the error of rotated codes is
    far smaller than of plain ones; with no outliers it is about the same."""
    x = rng.standard_normal((4096, 64))
    x[:, [3, 40]] *= 20  # two outlier channels, as measured in the default model's keys
    err = {}
    for rotated in (False, True):
        codes = Q8KVCache.from_cache(
            jkv.KVCache(
                jnp.asarray(x, jnp.float32)[None, None, None],
                jnp.asarray(x, jnp.float32)[None, None, None],
                jnp.array([4096]),
                jnp.array([0]),
            ),
            rotated=rotated,
        ).dequantize(jnp.float32)
        err[rotated] = np.linalg.norm(np.asarray(codes.k[0, 0, 0]) - x) / np.linalg.norm(x)
    assert err[True] < err[False] / 2, err


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


def codes_of(x, rotated, scale_dtype=jnp.float16):
    """What a cache stores for values ``x``: the codes of x, or of hadamard(x) when rotated."""
    return quantize(hadamard(x) if rotated else x, scale_dtype=scale_dtype)


# ---------------------------------------------------------------------- cache
def filled(rng, lengths, spec=SPEC, scale_dtype=jnp.float16, rotated=True):
    """A Q8 cache whose sequence b holds lengths[b] random positions in every layer, the original float32
    values, and NaN scales in every unused position (so that reading one shows up)."""
    lengths = np.asarray(lengths)
    shape = (spec.num_layers, len(lengths), spec.num_kv_heads, spec.max_len, spec.head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    cache = Q8KVCache.from_cache(
        jkv.KVCache(
            jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), jnp.zeros(len(lengths), jnp.int32)
        ),
        scale_dtype=scale_dtype,
        rotated=rotated,
    )
    unused = np.arange(spec.max_len)[None, :] >= lengths[:, None]  # (B, S)
    poison = lambda s: jnp.where(unused[None, :, None, :, None], jnp.nan, s).astype(s.dtype)
    cache = cache.replace(k_scale=poison(cache.k_scale), v_scale=poison(cache.v_scale))
    return cache.replace(dtype=spec.dtype), k, v


def np_q8(cache):
    """The cache's codes and scales as NumPy, for bit-exact comparisons."""
    return {name: np.array(getattr(cache, name)) for name in ("k", "k_scale", "v", "v_scale", "lengths", "errors")}


def assert_q8_equal(a, b):
    for name, x in np_q8(a).items():
        np.testing.assert_array_equal(x, np_q8(b)[name], err_msg=name)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=sname)
@pytest.mark.parametrize("head_dim", [32, 128])
def test_init_shapes_and_nbytes_ratios(dtype, scale_dtype, head_dim):
    spec = SPEC.replace(dtype=dtype, head_dim=head_dim, max_len=512)
    cache = Q8KVCache.init(spec, 4, scale_dtype=scale_dtype)
    shape = (3, 4, 2, 512, head_dim)
    chex.assert_shape([cache.k, cache.v], shape)
    chex.assert_shape([cache.k_scale, cache.v_scale], (*shape[:-1], head_dim // 32))
    chex.assert_type([cache.k, cache.v], jnp.int8)
    chex.assert_type([cache.k_scale, cache.v_scale], scale_dtype)
    assert cache.spec == spec and cache.batch == 4 and cache.max_len == 512 and cache.scale_dtype == scale_dtype
    assert cache.nbytes == jkv.quant.bytes_per_token(spec, scale_dtype) * 4 * 512 + 2 * 4 * 4
    # Per 32 values: 32 code bytes + one scale, against 128 (float32) or 64 (bfloat16) bytes.
    per_block = 32 + jnp.dtype(scale_dtype).itemsize
    f32 = jkv.KVCache.init(spec.replace(dtype=jnp.float32), 4).nbytes
    bf16 = jkv.KVCache.init(spec.replace(dtype=jnp.bfloat16), 4).nbytes
    assert f32 / cache.nbytes == pytest.approx(128 / per_block, rel=1e-4)  # 3.76 (f16 scales) or 3.56 (f32)
    assert bf16 / cache.nbytes == pytest.approx(64 / per_block, rel=1e-4)  # 1.88 or 1.78
    assert f32 / cache.nbytes > (3.76 if scale_dtype == jnp.float16 else 3.55)


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("t", [1, 3, 16])
def test_write_quantizes_only_the_new_positions(rng, t, scale_dtype, rotated):
    lengths = np.array([0, min(5, 16 - t), 16 - t, min(2, 16 - t)])
    cache, _, _ = filled(rng, lengths, scale_dtype=scale_dtype, rotated=rotated)
    before = np_q8(cache)
    k_new = jnp.asarray(blocky(rng, (4, 2, t, 64)), jnp.float32)
    v_new = jnp.asarray(blocky(rng, (4, 2, t, 64)), jnp.float32)
    out = jax.jit(lambda c, k, v: c.write(1, k, v))(cache, k_new, v_new)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, cache)
    kq, ks = codes_of(k_new, rotated, scale_dtype)
    vq, vs = codes_of(v_new, rotated, scale_dtype)
    want = before
    for b, n in enumerate(lengths):
        for name, new in (("k", kq), ("k_scale", ks), ("v", vq), ("v_scale", vs)):
            want[name][1, b, :, n : n + t] = np.asarray(new[b])
    written = np.zeros(cache.k.shape[:4], bool)  # (L, B, K, S)
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
    k, v = out.dequantize_layer(1, jnp.float32)
    for b, n in enumerate(lengths):
        scales = out.k_scale[1, b, :, n : n + t]
        assert within_format(k[b, :, n : n + t], k_new[b], scales, rotated)
        assert np.isfinite(np.asarray(v[b, :, n : n + t])).all()


def test_lengths_ops_and_rollback_then_write(rng):
    cache, _, _ = filled(rng, [3, 4, 5, 6])
    np.testing.assert_array_equal(cache.advance(2).lengths, [5, 6, 7, 8])
    np.testing.assert_array_equal(cache.reset_slot(2).lengths, [3, 4, 0, 6])
    np.testing.assert_array_equal(cache.reset().lengths, [0, 0, 0, 0])
    rolled = cache.rollback(jnp.array([1, 4, 0, 2]))
    np.testing.assert_array_equal(rolled.lengths, [1, 4, 0, 2])
    k_new = jnp.asarray(rng.standard_normal((4, 2, 1, 64)), jnp.float32)
    out = rolled.write(0, k_new, k_new)
    for b, n in enumerate([1, 4, 0, 2]):
        np.testing.assert_array_equal(np.asarray(out.k[0, b, :, n]), np.asarray(codes_of(k_new[b, :, 0], True)[0]))


@pytest.mark.parametrize("single_len", [1, 16])
@pytest.mark.parametrize("slot", [0, 3])
def test_insert_into_slot_and_extract_bit_exact(rng, slot, single_len):
    cache, _, _ = filled(rng, [2, 9, 4, 11])
    single, _, _ = filled(rng, [single_len], SPEC.replace(max_len=single_len))
    out = cache.insert_into_slot(slot, single)
    want = np_q8(cache)
    for name, x in np_q8(single).items():
        if name in ("lengths", "errors"):
            want[name][slot] = x[0]
        else:
            want[name][:, slot, :, :single_len] = x[:, 0]
    for name, x in np_q8(out).items():
        np.testing.assert_array_equal(x, want[name], err_msg=name)
    back = out.extract_slot(slot, max_len=single_len)
    assert back.dtype == single.dtype
    assert_q8_equal(back, single)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=sname)
@pytest.mark.parametrize("trim", [True, False])
def test_snapshot_restore_bit_exact(rng, scale_dtype, trim):
    rotated = scale_dtype == jnp.float16  # both bases, both scale dtypes
    cache, _, _ = filled(rng, [3, 0, 7], SPEC.replace(dtype=jnp.bfloat16), scale_dtype=scale_dtype, rotated=rotated)
    cache = cache.replace(errors=jnp.array([0, ERR_WRITE_OVERFLOW, 0], jnp.int32))
    snap = cache.snapshot(trim=trim)
    keep = 7 if trim else 16
    assert isinstance(snap.k, np.ndarray) and snap.k.shape[3] == keep and snap.k_scale.dtype == scale_dtype
    back = Q8KVCache.restore(snap)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, cache)
    assert back.spec == cache.spec and back.rotated == rotated
    cut = lambda c: c.replace(**{n: getattr(c, n)[:, :, :, :keep] for n in ("k", "k_scale", "v", "v_scale")})
    assert_q8_equal(cut(back), cut(cache))  # NaN scales of unused positions compare equal too
    bigger = Q8KVCache.restore(snap, max_len=32)
    assert bigger.max_len == 32
    assert_q8_equal(cut(bigger), cut(cache))


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
def test_dequantize_whole_cache_and_from_cache(rng, rotated):
    cache, k, _ = filled(rng, [16, 16, 16], SPEC.replace(dtype=jnp.bfloat16), rotated=rotated)
    assert cache.rotated == rotated
    full = cache.dequantize()
    assert isinstance(full, jkv.KVCache) and full.spec == cache.spec
    chex.assert_type(full.k, jnp.bfloat16)
    full32 = cache.dequantize(jnp.float32)
    assert within_format(full32.k, k, cache.k_scale, rotated)
    v = dequantize(cache.v, cache.v_scale)
    np.testing.assert_array_equal(np.asarray(full32.v), np.asarray(hadamard(v) if rotated else v))
    layer_k, layer_v = cache.dequantize_layer(1, jnp.float32)
    np.testing.assert_array_equal(np.asarray(layer_k), np.asarray(full32.k[1]))
    np.testing.assert_array_equal(np.asarray(layer_v), np.asarray(full32.v[1]))
    np.testing.assert_array_equal(np.asarray(full.lengths), [16, 16, 16])


def test_cache_errors_eager(rng):
    cache, _, _ = filled(rng, [14, 2])
    k3 = jnp.asarray(rng.standard_normal((2, 2, 3, 64)), jnp.float32)
    one = lambda **kw: Q8KVCache.init(SPEC.replace(**kw), 1)
    cases = [
        (lambda: Q8KVCache.init(SPEC.replace(head_dim=48), 1), ValueError, "head_dim=48 must be a multiple of 32"),
        (lambda: Q8KVCache.init("spec", 1), TypeError, "jkv.CacheSpec"),
        (lambda: Q8KVCache.init(SPEC, 0), ValueError, "batch must be a positive int"),
        (lambda: Q8KVCache.init(SPEC, 1, scale_dtype=jnp.int8), TypeError, "float16 or float32, got int8"),
        (lambda: Q8KVCache.from_cache("x"), TypeError, "must be a KVCache"),
        (lambda: Q8KVCache.from_cache(jkv.KVCache.init(SPEC.replace(head_dim=8), 1)), ValueError, "head_dim=8"),
        (lambda: cache.write(0, k3, k3), ValueError, "past max_len=16"),
        (lambda: cache.write(0, k3, k3[:, :, :2]), ValueError, "must match"),
        (lambda: cache.write(0, k3[..., :32], k3[..., :32]), ValueError, "D=64"),
        (lambda: cache.write(3, k3[:, :, :1], k3[:, :, :1]), ValueError, "layer=3 out of range"),
        (lambda: cache.dequantize_layer(5), ValueError, "layer=5 out of range"),
        (lambda: cache.insert_into_slot(0, "x"), TypeError, "must be a Q8KVCache"),
        (lambda: cache.insert_into_slot(0, jkv.KVCache.init(SPEC, 1)), TypeError, "must be a Q8KVCache"),
        (lambda: cache.insert_into_slot(0, one(head_dim=32)), ValueError, "head_dim=32"),
        (lambda: cache.insert_into_slot(0, one(dtype=jnp.bfloat16)), ValueError, "dtype=bfloat16"),
        (
            lambda: cache.insert_into_slot(0, Q8KVCache.init(SPEC, 1, scale_dtype=jnp.float32)),
            ValueError,
            "scale_dtype=float32, expected float16",
        ),
        (
            lambda: cache.insert_into_slot(0, Q8KVCache.init(SPEC, 1, rotated=False)),
            ValueError,
            "rotated=False, expected True",
        ),
        (lambda: Q8KVCache.init(SPEC, 1, rotated="yes"), TypeError, "rotated must be a bool, got 'yes'"),
        (lambda: cache.insert_into_slot(0, Q8KVCache.init(SPEC, 2)), ValueError, "batch=2"),
        (lambda: cache.insert_into_slot(0, one(max_len=17)), ValueError, "max_len=17 exceeds"),
        (lambda: cache.insert_into_slot(2, one()), ValueError, "slot=2 out of range"),
        (lambda: cache.extract_slot(0, max_len=40), ValueError, "max_len=40"),
        (lambda: Q8KVCache.restore(jkv.KVCache.init(SPEC, 1).snapshot()), TypeError, "Q8Snapshot"),
        (lambda: Q8KVCache.restore(cache.snapshot(), max_len=8), ValueError, "max_len=8"),
    ]
    for fn, exc, text in cases:
        with pytest.raises(exc) as info:
            fn()
        assert text in str(info.value), (text, str(info.value))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [14, 2])


def test_errors_under_jit_flag_and_never_corrupt(rng):
    cache, _, _ = filled(rng, [14, 2])
    k3 = jnp.asarray(rng.standard_normal((2, 2, 3, 64)), jnp.float32)
    out = jax.jit(lambda c, k: c.write(0, k, k))(cache, k3)
    np.testing.assert_array_equal(np.asarray(out.errors), [ERR_WRITE_OVERFLOW, 0])
    np.testing.assert_array_equal(np.asarray(out.k[:, 0]), np.asarray(cache.k[:, 0]))  # refused: untouched
    np.testing.assert_array_equal(np.asarray(out.k_scale[:, 0]), np.asarray(cache.k_scale[:, 0]))
    np.testing.assert_array_equal(np.asarray(out.k[0, 1, :, 2:5]), np.asarray(codes_of(k3[1], True)[0]))
    with pytest.raises(RuntimeError, match="sequence 0: write past max_len"):
        out.check()
    bad = jax.jit(lambda c, s, i: c.insert_into_slot(i, s))(cache, Q8KVCache.init(SPEC, 1), 7)
    np.testing.assert_array_equal(np.asarray(bad.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(bad.lengths), [14, 2])
    assert (np.asarray(bad.errors) & ERR_BAD_SLOT).all()


def test_donated_write_runs_in_place(rng):
    """The compiled step aliases the donated codes and scales and allocates no copy of them."""
    spec = jkv.CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, max_len=1024, dtype=jnp.bfloat16)
    cache = Q8KVCache.init(spec, 8)
    k_new = jnp.asarray(rng.standard_normal((8, 2, 1, 64)), jnp.bfloat16)

    def step(c, k):
        for layer in range(spec.num_layers):
            c = c.write(layer, k, k)
        return c.advance(1)

    stats = jax.jit(step, donate_argnums=0).lower(cache, k_new).compile().memory_analysis()
    assert stats.alias_size_in_bytes >= cache.nbytes - 64
    assert stats.temp_size_in_bytes < cache.k.nbytes // 16, stats
    plain = jax.jit(step).lower(cache, k_new).compile().memory_analysis()
    assert plain.alias_size_in_bytes == 0


# ---------------------------------------------------------------------- attention through a Q8 cache
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
    """Through jkv.decode_attention (the Pallas path: interpret mode off the GPU); a rotated cache attends in the
    rotated basis on the Pallas path and over rotated-back values on the XLA path: both equal the reference."""
    spec = jkv.CacheSpec(2, kv_heads, head_dim, max_len, jnp.float32)
    lengths = rng.integers(1, max_len, batch)
    lengths[0] = max_len - 1  # attends to every position
    cache, k, v = filled(rng, lengths, spec, scale_dtype, rotated)
    k_new = rng.standard_normal((batch, kv_heads, 1, head_dim)).astype(np.float32)
    cache = cache.write(1, jnp.asarray(k_new), jnp.asarray(k_new))
    k[1, np.arange(batch), :, lengths] = k_new[:, :, 0]
    v[1, np.arange(batch), :, lengths] = k_new[:, :, 0]
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), jnp.float32)
    out = jkv.decode_attention(q, cache, 1, impl=impl)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, jnp.float32)
    deq_k, deq_v = (np.asarray(x, np.float64) for x in cache.dequantize_layer(1, jnp.float32))
    # Equal to "dequantize, then attend" to float32 rounding ...
    ref_q8 = decode_attention_f64(q, deq_k, deq_v, lengths + 1)
    # The kernel's float32 products: exact in interpret mode, tf32 on a GPU (test_q8_kernel.KERNEL_TOL).
    tol = 10 * REL_TOL["float32"] if impl == "xla" else 2e-3 if backend.gpu_backend() == backend.TRITON else 2e-5
    assert rel_err(out, ref_q8) < tol
    # ... and within the measured Q8 error of attention over the unquantized values.
    err = rel_err(out, decode_attention_f64(q, k[1], v[1], lengths + 1))
    assert 1e-4 < err < Q8_ATTENTION_REL_TOL, err


def test_prefill_attention_q8_xla(rng):
    cache, _, _ = filled(rng, [5, 0, 9])
    t = 4
    k_new = jnp.asarray(rng.standard_normal((3, 2, t, 64)), jnp.float32)
    cache = cache.write(2, k_new, -k_new)
    q = jnp.asarray(rng.standard_normal((3, t, 4, 64)), jnp.float32)
    out = jkv.prefill_attention(q, cache, 2, impl="xla")
    deq_k, deq_v = cache.dequantize_layer(2, jnp.float32)
    positions = np.array([5, 0, 9])[:, None] + np.arange(t)
    assert rel_err(out, attention_f64(q, deq_k, deq_v, positions)) < 10 * REL_TOL["float32"]
    with pytest.raises(TypeError, match="cache must be a jkv cache, got dict"):
        jkv.prefill_attention(q, {}, 0)
    with pytest.raises(TypeError, match="cache must be a jkv cache, got dict"):
        jkv.decode_attention(q[:, 0], {}, 0)
