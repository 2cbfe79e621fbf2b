"""Storage formats of K/V caches as pure ``jnp`` functions: the single source of their arithmetic.

* Q8: a vector of ``D`` values (``D`` a multiple of 32) is cut into blocks of 32; each block stores
  ``scale = max|x| / 127`` (float16 rounded *up*, or float32) and ``q = round(x / scale)`` in int8 ``[-127, 127]``.
  The round trip error of every value is at most ``scale / 2``.
* FP8: a vector of ``D`` values stores ``scale = max|x| / 448`` in float32 and ``x / scale`` in float8_e4m3fn.
  e4m3 keeps 3 mantissa bits, so each value's error is at most ``|x| / 16`` plus ``scale / 2**10`` (e4m3's
  subnormal step, for values below ``2**-6 * scale``).
* ``hadamard``: the orthonormal Walsh-Hadamard rotation Q8 caches apply before quantizing (docs/quant.md).

The quantizers return ``ok``: false where a finite input could not be represented (a Q8 block beyond a float16
scale's range); such a block is stored saturated at the largest finite scale, never as NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int8

Q8_BLOCK = 32  # values sharing one scale, consecutive along head_dim
Q8_MAX = 127  # int8 codes are symmetric: [-127, 127]
FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# How hadamard computes the same matrix: "sum" (a reduction XLA fuses: fastest for a decode step's few vectors on
# a GPU), "dot" (a float32 matrix product: prefills, and every size off the GPU), "butterfly" (log2 n add stages),
# "auto" (sum up to SUM_MAX_VECTORS vectors on a GPU, else dot; the measurements are in docs/quant.md).
HADAMARD_IMPLS = ("auto", "sum", "dot", "butterfly")
SUM_MAX_VECTORS = 4096


def hadamard_block(d: int) -> int:
    """Largest power of two dividing ``d``: the size of the Walsh-Hadamard blocks ``hadamard`` uses."""
    return d & -d


@functools.cache
def _hadamard_matrix(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(n))


def hadamard(x: Float[Array, "... D"], impl: str = "auto") -> Float[Array, "... D"]:
    """``x`` times the orthonormal, symmetric Walsh-Hadamard matrix (block diagonal for any ``D``), in float32;
    its own inverse up to float32 rounding."""
    if impl not in HADAMARD_IMPLS:
        raise ValueError(f"hadamard impl={impl!r} is not one of {HADAMARD_IMPLS}")
    d = x.shape[-1]
    n = hadamard_block(d)
    y = x.astype(jnp.float32).reshape(*x.shape[:-1], d // n, n)
    if impl == "auto":
        impl = "sum" if jax.default_backend() == "gpu" and x.size // d <= SUM_MAX_VECTORS else "dot"
    if impl == "sum":
        y = jnp.sum(y[..., None, :] * _hadamard_matrix(n), axis=-1)
    elif impl == "dot":
        y = jnp.einsum("...i,ij->...j", y, _hadamard_matrix(n), precision=lax.Precision.HIGHEST)
    else:
        h = 1
        while h < n:  # stage h: pairs (i, i + h) within each run of 2h values become (a + b, a - b)
            y = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
            a, b = y[..., 0, :], y[..., 1, :]
            y = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], d // n, n)
            h *= 2
        y = y * np.float32(1 / np.sqrt(n))
    return y.reshape(x.shape)


def f16_value(x: Array) -> Array:
    """The float32 value of float16 ``x`` from its bits (not ``astype``: XLA may drop a float32 -> float16 ->
    float32 round trip on GPUs, and the rounding up must compare the value actually stored)."""
    bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.int32)
    sign = jnp.where(bits >> 15, -1.0, 1.0).astype(jnp.float32)
    exponent, mantissa = (bits >> 10) & 31, (bits & 1023).astype(jnp.float32)
    # Normal: (1024 + m) * 2^(e - 25); subnormal (e = 0): m * 2^-24. Both products are exact in float32.
    power = lax.bitcast_convert_type((jnp.maximum(exponent, 1) - 25 + 127) << 23, jnp.float32)
    return sign * jnp.where(exponent > 0, 1024.0 + mantissa, mantissa) * power


def quantize_q8(
    x: Float[Array, "... D"], scale_dtype
) -> tuple[Int8[Array, "... D"], Float[Array, "... D//32"], Bool[Array, "... D//32"]]:
    """``(codes, scales, ok)``; ``ok`` is false where a finite block had no finite scale (stored saturated)."""
    scale_dtype = jnp.dtype(scale_dtype)
    d = x.shape[-1]
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], d // Q8_BLOCK, Q8_BLOCK)  # (..., D/32, 32)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = amax / Q8_MAX
    ok = jnp.ones(amax.shape, bool)
    if scale_dtype != jnp.float32:
        top = float(jnp.finfo(scale_dtype).max)
        ok = (scale <= top) | ~jnp.isfinite(amax)
        stored = jnp.minimum(scale, top).astype(scale_dtype)
        # Round up, never down: with stored >= max|x| / 127 no value needs a code beyond 127.
        stored = jnp.where(f16_value(stored) < scale, jnp.nextafter(stored, jnp.inf), stored)
        stored = jnp.where(jnp.isfinite(stored), stored, jnp.asarray(top, scale_dtype))
        s = f16_value(stored)[..., None]
    else:
        stored = scale.astype(jnp.float32)
        s = stored[..., None]
    # An all-zero block has scale 0: its codes are 0 (dividing would give NaN).
    codes = jnp.where(s > 0, jnp.round(blocks / jnp.where(s > 0, s, 1)), 0)
    codes = jnp.clip(codes, -Q8_MAX, Q8_MAX).astype(jnp.int8).reshape(x.shape)
    return codes, stored, ok


def dequantize_q8(codes: Int8[Array, "... D"], scales: Float[Array, "... D//32"], dtype) -> Float[Array, "... D"]:
    """``codes * scales`` (each scale over its block of 32), in float32, returned in ``dtype``."""
    d = codes.shape[-1]
    blocks = codes.astype(jnp.float32).reshape(*codes.shape[:-1], d // Q8_BLOCK, Q8_BLOCK)
    return (blocks * scales.astype(jnp.float32)[..., None]).reshape(codes.shape).astype(dtype)


def quantize_fp8(x: Float[Array, "... D"]) -> tuple[Array, Float[Array, "... 1"]]:
    """``(values float8_e4m3fn[..., D], scale float32[..., 1])`` with ``scale = max|x| / 448`` per vector."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / FP8_MAX
    safe = jnp.where(scale > 0, scale, 1)
    # Clip: a quotient rounded just above 448 would become NaN in float8_e4m3fn (it has no infinity).
    values = jnp.clip(xf / safe, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return values, scale


def dequantize_fp8(values: Array, scale: Float[Array, "... 1"], dtype) -> Float[Array, "... D"]:
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
