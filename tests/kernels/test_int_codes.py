"""pallas_kernels.int_codes: the bit-level conversions give exactly the values of a plain conversion, for every
code, in plain jnp and inside a Pallas kernel (interpret mode), and the Q8 kernels agree across methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import block_formats, decode_q8, int_codes

ALL_CODES = np.arange(-128, 128).reshape(16, 16)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("method", int_codes.METHODS)
def test_every_int8_code_exact(dtype, method):
    codes = jnp.asarray(ALL_CODES, jnp.int8)
    out = int_codes.int8_to(codes, dtype, method)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), ALL_CODES.astype(np.float32))

    def kernel(c_ref, o_ref):
        o_ref[...] = int_codes.int8_to(c_ref[...], dtype, method)

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(codes.shape, dtype), interpret=True)
    np.testing.assert_array_equal(np.asarray(call(codes).astype(jnp.float32)), ALL_CODES.astype(np.float32))


def test_small_to_f32_exact():
    values = np.concatenate([np.arange(0, 4096), [2**20, 2**23 - 1]]).astype(np.int32)
    for method in int_codes.METHODS:
        out = int_codes.small_to_f32(jnp.asarray(values), method)
        np.testing.assert_array_equal(np.asarray(out), values.astype(np.float32))


def test_refusals():
    with pytest.raises(ValueError, match="method='fast'"):
        int_codes.int8_to(jnp.zeros(4, jnp.int8), jnp.bfloat16, "fast")
    with pytest.raises(TypeError, match="int8"):
        int_codes.int8_to(jnp.zeros(4, jnp.int16), jnp.bfloat16)
    with pytest.raises(ValueError, match="method='x'"):
        int_codes.small_to_f32(jnp.zeros(4, jnp.int32), "x")


@pytest.mark.parametrize("fmt", sorted(block_formats.FORMATS))
def test_dequantize_tile_same_across_methods(fmt, monkeypatch):
    rng = np.random.default_rng(7)
    n, k = 8, 256
    planes = []
    for plane, shape in zip(block_formats.block_format(fmt).planes, block_formats.plane_shapes(fmt, n, k), strict=True):
        if jnp.issubdtype(plane.dtype, jnp.integer):
            info = np.iinfo(plane.dtype)
            planes.append(jnp.asarray(rng.integers(info.min, info.max + 1, shape), plane.dtype))
        else:
            planes.append(jnp.asarray(rng.uniform(0.01, 2.0, shape), plane.dtype))
    outs = {}
    for method in int_codes.METHODS:
        monkeypatch.setattr(block_formats, "CONVERT", method)
        outs[method] = [np.asarray(t) for t in block_formats.dequantize_tile(fmt, planes)]
    for a, b in zip(outs["cvt"], outs["bits"], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16, jnp.float32), ids=lambda d: jnp.dtype(d).name)
def test_q8_decode_same_across_methods(dtype):
    rng = np.random.default_rng(3)
    b, n, kh, s, d = 3, 8, 2, 96, 64
    q = jnp.asarray(rng.standard_normal((b, n, d)), dtype)
    k, v = (jnp.asarray(rng.integers(-128, 128, (1, b, kh, s, d)), jnp.int8) for _ in range(2))
    ks, vs = (jnp.asarray(rng.uniform(0.001, 0.05, (1, b, kh, s, d // 32)), jnp.float16) for _ in range(2))
    lengths = jnp.asarray([96, 1, 37], jnp.int32)
    config = decode_q8.q8_decode_config(b, kh, s, d)
    args = (q, k, ks, v, vs, lengths, jnp.zeros(1, jnp.int32))
    outs = [
        np.asarray(decode_q8._decode(*args, scale=0.125, config=config, interpret=True, convert=m), np.float32)
        for m in int_codes.METHODS
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.isfinite(outs[0]).all()
