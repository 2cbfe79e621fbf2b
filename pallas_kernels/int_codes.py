"""Exact conversion of int8 codes to the floating dtype of a tensor-core product, in integer and add instructions.

A plain ``codes.astype(jnp.bfloat16)`` lowers to an int-to-float conversion (and, for bf16, a second
float-to-float one) per element. On Hopper those run on the conversion units at a fraction of the arithmetic rate,
and a kernel that dequantizes every byte it reads (the Q8 decode kernels, the Q8_0 weight products) can be bound
by them rather than by memory. Every int8 value is exact in bf16, f16 and f32, so the same values can be made
from the codes' bits instead (``method="bits"``):

* float32: the code plus ``0x4B000080`` is the bit pattern of ``2**23 + 128 + code`` (``2**23`` fixes the
  exponent so the low mantissa bits are the integer); one float subtraction of ``2**23 + 128`` leaves the code.
* bfloat16: that float32 has at most 8 significant bits, so its upper 16 bits are the bfloat16 of the code
  (a shift and a truncation, no rounding).
* float16: ``0x6480 + code`` as 16 bits is ``1024 + 128 + code`` (10 mantissa bits); one half-precision
  subtraction of 1152.

Small non-negative integers (a weight's 4-bit or 6-bit codes, held as int32) become float32 the same way
(:func:`small_to_f32`: an OR and a subtraction). ``method="cvt"`` keeps the plain conversion. Both give identical
values (tests/kernels/test_int_codes.py checks every code, in and out of kernels); which is faster is the GPU's
to say (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

METHODS = ("cvt", "bits")
_F32_BIAS = 0x4B000080  # bits of 2**23 + 128
_F32_OFFSET = 8388736.0  # 2**23 + 128
_F16_BIAS = 0x6480  # bits of 1024 + 128
_F16_OFFSET = 1152.0


def int8_to(codes, dtype, method: str = "bits"):
    """``codes`` (int8, any shape) as ``dtype`` (float32, bfloat16, float16; others by ``astype``), exactly."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    dtype = jnp.dtype(dtype)
    if codes.dtype != jnp.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    if method == "cvt" or dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return codes.astype(dtype)
    if dtype == jnp.float16:
        bits = codes.astype(jnp.int16) + jnp.int16(_F16_BIAS)
        return lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(_F16_OFFSET)
    bits = codes.astype(jnp.int32) + jnp.int32(_F32_BIAS)
    value = lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(_F32_OFFSET)
    if dtype == jnp.float32:
        return value
    high = lax.shift_right_logical(lax.bitcast_convert_type(value, jnp.uint32), jnp.uint32(16))
    return lax.bitcast_convert_type(high.astype(jnp.uint16), jnp.bfloat16)


def small_to_f32(values, method: str = "bits"):
    """``values`` (int32 in ``[0, 2**23)``: unpacked nibbles and the like) as float32, exactly."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if method == "cvt":
        return values.astype(jnp.float32)
    bits = values | jnp.int32(0x4B000000)  # 2**23 + value
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(8388608.0)
