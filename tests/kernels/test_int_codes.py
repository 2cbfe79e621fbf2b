"""pallas_kernels.int_codes: the bit-level conversion gives exactly the values of a plain one, for every int8 code,
in plain jnp and inside a Pallas kernel (interpret mode); the weight tiles agree across methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import block_formats, int_codes, quantized_matmul

ALL_CODES = np.arange(-128, 128).reshape(16, 16)


@pytest.mark.parametrize("method", int_codes.METHODS)
def test_every_int8_code_exact(method):
    codes = jnp.asarray(ALL_CODES, jnp.int8)
    out = int_codes.int8_to_f32(codes, method)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), ALL_CODES.astype(np.float32))

    def kernel(c_ref, o_ref):
        o_ref[...] = int_codes.int8_to_f32(c_ref[...], method)

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(codes.shape, jnp.float32), interpret=True)
    np.testing.assert_array_equal(np.asarray(call(codes)), ALL_CODES.astype(np.float32))


def test_refusals():
    with pytest.raises(ValueError, match="method='fast'"):
        int_codes.int8_to_f32(jnp.zeros(4, jnp.int8), "fast")
    with pytest.raises(TypeError, match="int8"):
        int_codes.int8_to_f32(jnp.zeros(4, jnp.int16))


def any_planes(rng, fmt: str, n: int, k: int) -> list:
    """``fmt``'s planes of an ``n x k`` matrix: every integer plane's bytes uniform over the dtype, scales in
    [0.01, 2]."""
    planes = []
    for plane, shape in zip(block_formats.block_format(fmt).planes, block_formats.plane_shapes(fmt, n, k), strict=True):
        if jnp.issubdtype(plane.dtype, jnp.integer):
            info = np.iinfo(plane.dtype)
            planes.append(jnp.asarray(rng.integers(info.min, info.max + 1, shape), plane.dtype))
        else:
            planes.append(jnp.asarray(rng.uniform(0.01, 2.0, shape), plane.dtype))
    return planes


@pytest.mark.parametrize("fmt", sorted(block_formats.FORMATS))
def test_dequantize_tile_same_across_methods(fmt, monkeypatch):
    rng = np.random.default_rng(7)
    n, k = 8, 256
    planes = any_planes(rng, fmt, n, k)
    outs = {}
    for method in int_codes.METHODS:
        monkeypatch.setattr(block_formats, "CONVERT", method)
        monkeypatch.setattr(block_formats, "NIBBLE_CONVERT", method)
        outs[method] = [np.asarray(t) for t in block_formats.dequantize_tile(fmt, planes)]
    for a, b in zip(outs["cvt"], outs["bits"], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bias", [0.0, 8.0])
def test_nibbles_to_f32_every_byte(bias):
    """Every byte's low and high nibble, less ``bias``: the value times its factor is the nibble's, exactly, by
    either method; times a scale (as the tiles take it) the two methods agree bit for bit."""
    data = np.arange(256, dtype=np.int32)
    want = ((data & 15) - bias, (data >> 4) - bias)
    scale = np.float32(0.0123)
    got = {}
    for method in int_codes.METHODS:
        parts = int_codes.nibbles_to_f32(jnp.asarray(data), bias, method)
        for (value, factor), expected in zip(parts, want, strict=True):
            np.testing.assert_array_equal(np.asarray(value, np.float64) * factor, expected)
        got[method] = [np.asarray(value) * (scale * np.float32(factor)) for value, factor in parts]
    for a, b in zip(got["cvt"], got["bits"], strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="method='fast'"):
        int_codes.nibbles_to_f32(jnp.asarray(data), bias, "fast")


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q4_K"])
def test_nibble_kernel_same_across_methods(fmt, monkeypatch):
    """The dot kernel (interpret mode) with its nibbles converted either way: the same product, bit for bit."""
    rng = np.random.default_rng(11)
    n, k, m = 64, 512, 24
    planes = any_planes(rng, fmt, n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    outs = {}
    for method in int_codes.METHODS:
        monkeypatch.setattr(block_formats, "NIBBLE_CONVERT", method)
        jax.clear_caches()  # the kernel's trace reads the setting
        outs[method] = np.asarray(quantized_matmul.qmatmul(x, planes, fmt, interpret=True))
    np.testing.assert_array_equal(outs["cvt"], outs["bits"])


def test_round_rows_scales_each_row_to_its_peak():
    """Each row's largest magnitude becomes +-127, every code is within half a unit of ``x / unit`` (halves round
    up), and a row of zeros gives zero codes and a zero unit (no NaN)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 32)).astype(np.float32) * np.float32([[0.01], [1.0], [30.0], [1.0], [0.0]])
    x[3, 7] = -4.0  # a negative peak
    codes, unit = (np.asarray(a) for a in int_codes.round_rows(jnp.asarray(x)))
    assert codes.dtype == np.int8 and unit.dtype == np.float32
    np.testing.assert_array_equal(np.abs(codes[:4]).max(axis=1), 127)
    assert codes[3, 7] == -127 and not codes[4].any() and unit[4] == 0.0
    np.testing.assert_allclose(unit[:4], np.abs(x[:4]).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(codes[:4] * unit[:4, None] - x[:4])
    assert (err <= 0.5 * unit[:4, None] * (1 + 1e-5)).all()
    half = jnp.asarray([[127.0, 0.5, -0.5, 1.5, -1.5, 2.5]], jnp.float32)  # unit 1: the halves
    np.testing.assert_array_equal(np.asarray(int_codes.round_rows(half)[0]), [[127, 1, 0, 2, -1, 3]])
