"""The storage formats: Q8's round trip bound (plain and Hadamard-rotated), its scales, the rotation itself, and
format errors. (fp8's bound: tests/caches/test_kinds.py; every cache kind's behaviour: the same file.)"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv import memory
from jkv.caches.formats import BLOCK, dequantize, quantize
from pallas_kernels.formats import HADAMARD_IMPLS, hadamard, hadamard_block
from pallas_kernels.formats import Q8_MAX as QMAX

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
        (lambda: memory.bytes_per_token(SPEC.replace(head_dim=40), jkv.Q8()), ValueError, "head_dim=40 must be a"),
        (lambda: jkv.KVCache.init(SPEC.replace(head_dim=40), 1, format=jkv.Q8()), ValueError, "head_dim=40 must be"),
        (lambda: jkv.Q8(hadamard_impl="fft"), ValueError, "hadamard_impl='fft' is not one of"),
        (lambda: jkv.Q8(rotated=1), TypeError, "rotated must be a bool"),
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


# Jitted as it runs inside a step (eagerly, each butterfly stage's operations would compile one by one).
_hadamard = jax.jit(hadamard, static_argnums=1)


@pytest.mark.parametrize("impl", HADAMARD_IMPLS)
@pytest.mark.parametrize("d,block", [(32, 32), (64, 64), (96, 32), (128, 128), (192, 64), (256, 256)])
def test_hadamard_is_the_orthonormal_block_matrix(rng, d, block, impl):
    assert hadamard_block(d) == block
    x = rng.standard_normal((3, 5, d))
    want = x.reshape(3, 5, d // block, block) @ hadamard_f64(block)  # block diagonal
    got = _hadamard(jnp.asarray(x, jnp.float32), impl)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(np.asarray(got, np.float64), want.reshape(x.shape), atol=1e-5 * np.abs(x).max())
    # Its own inverse, and dot products (attention scores) are kept.
    np.testing.assert_allclose(np.asarray(_hadamard(got, impl)), x, atol=1e-5 * np.abs(x).max())
    y = rng.standard_normal((3, 5, d))
    dots = np.sum(np.asarray(got, np.float64) * np.asarray(_hadamard(jnp.asarray(y, jnp.float32), impl)), -1)
    np.testing.assert_allclose(dots, np.sum(x * y, -1), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="impl='fft' is not one of"):
        hadamard(got, "fft")


def test_rotation_spreads_outlier_channels(rng):
    """The reason for the rotation: with a few large channels (as keys have), the error of rotated codes is
    far smaller than of plain ones; with no outliers it is about the same."""
    x = rng.standard_normal((4096, 64))
    x[:, [3, 40]] *= 20  # two outlier channels, as measured in the default model's keys
    err = {}
    for rotated in (False, True):
        k = _stored_in(jnp.asarray(x, jnp.float32)[None, None], jkv.Q8(rotated=rotated))  # (B, K, T, D)
        err[rotated] = np.linalg.norm(np.asarray(k[0, 0]) - x) / np.linalg.norm(x)
    assert err[True] < err[False] / 2, err


@functools.partial(jax.jit, static_argnums=1)
def _stored_in(xs, fmt):
    """Keys ``xs [1, 1, T, D]`` written to a float cache, re-stored in ``fmt`` and read back as float32."""
    spec = jkv.CacheSpec(num_layers=1, num_kv_heads=1, head_dim=xs.shape[-1], max_len=xs.shape[2])
    cache = jkv.KVCache.init(spec, 1).begin(xs.shape[2]).write(0, xs, xs).commit()
    return cache.with_format(fmt).layer(0, jnp.float32)[0]
