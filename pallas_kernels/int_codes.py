"""Exact int8-to-float32 conversion in integer and add instructions, for kernels that dequantize every byte.

A plain ``codes.astype(jnp.float32)`` lowers to an int-to-float conversion per element, which Hopper runs on its
conversion units at a fraction of the arithmetic rate. The same values come from the codes' bits: the code plus
``0x4B000080`` is the bit pattern of the float ``2**23 + 128 + code`` (``2**23`` fixes the exponent so the low
mantissa bits are the integer), and one float subtraction of ``2**23 + 128`` leaves the code, exactly.

``method="bits"`` is that; ``"cvt"`` the plain conversion. Measured on an H100 (docs/BENCHMARKS.md, "Int8 codes
into the tensor cores"), the Q8_0 weight products run faster with ``"bits"``; the Q8 attention kernels and the
4-bit formats' nibbles did not, and keep plain conversions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

METHODS = ("cvt", "bits")
_BIAS = 0x4B000080  # the bits of 2**23 + 128
_OFFSET = 8388736.0  # 2**23 + 128
_EXPONENT = 0x4B000000  # the bits of 2**23
_TWO_23 = 8388608.0


def int8_to_f32(codes, method: str = "bits"):
    """``codes`` (int8, any shape) as float32, exactly, by ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if codes.dtype != jnp.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    if method == "cvt":
        return codes.astype(jnp.float32)
    bits = codes.astype(jnp.int32) + jnp.int32(_BIAS)
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(_OFFSET)


def nibbles_to_f32(nibbles, bias: float = 0.0, method: str = "cvt") -> tuple:
    """The low and high nibbles of ``nibbles`` (int32 holding bytes) less ``bias``, as float32, exactly:
    ``((low - bias, 1), (high_value, factor))``, the high part's value times its factor being ``high - bias``.
    ``"cvt"``: plain conversions (factor 1). ``"bits"``: no conversion instruction: a nibble or'ed into the low
    mantissa bits of ``2**23`` (``0x4B000000``) is the float ``2**23 + nibble``, and one subtraction (of ``2**23``
    and the bias) leaves the value; the high nibble is taken in place (``byte & 0xF0``: sixteen times its value,
    so factor 1/16, which a scale takes exactly). A product ``value * (scale * factor)`` then equals the plain
    one bit for bit: the two exact products are the same real number."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if method == "cvt":
        low, high = (nibbles & 15).astype(jnp.float32), lax.shift_right_logical(nibbles, 4).astype(jnp.float32)
        return ((low - bias, 1.0), (high - bias, 1.0)) if bias else ((low, 1.0), (high, 1.0))
    as_float = lambda bits: lax.bitcast_convert_type(bits | jnp.int32(_EXPONENT), jnp.float32)
    low = as_float(nibbles & 15) - jnp.float32(_TWO_23 + bias)
    high = as_float(nibbles & 0xF0) - jnp.float32(_TWO_23 + 16 * bias)
    return (low, 1.0), (high, 1.0 / 16)


def round_rows(x):
    """Each row of float32 ``x [..., C]`` (its last axis) rounded to int8 with its own scale: ``(codes, unit)``,
    ``codes`` int8 with the row's largest magnitude at +-127 (``floor(x * 127 / peak + 0.5)``: half rounds up; Triton
    lowers no round-to-even) and ``unit [...]`` float32 the value of one code (``peak / 127``; 0 for a row of
    zeros, whose codes are 0). Inside a kernel: multiplies, one division a row. The one rounding rule of the Q8
    kernel's ``iq8`` query and of the dp4a path's activations (``qmatmul_dp4a``, ``qmatmul_act``)."""
    peak = jnp.max(jnp.abs(x), axis=-1)
    inv = jnp.where(peak > 0, 127.0 / jnp.where(peak > 0, peak, 1.0), 0.0)
    codes = jnp.clip(jnp.floor(x * inv[..., None] + 0.5), -127.0, 127.0).astype(jnp.int8)
    return codes, peak * (1.0 / 127.0)
