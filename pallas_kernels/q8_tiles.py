"""The tiles of the Q8 / FP8 decode body (``decode_q8.decode_kernel``): its products' dtype and float16's range,
how many query rows a chunk's row block takes, the ``vperm`` form's column order of the value tile and the
``srot`` form's order of the row blocks' chunks."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import MIN_BLOCK


def dot_dtype_for(q_dtype, values_dtype=jnp.int8) -> jnp.dtype:
    """Operand dtype of the kernel's products: a 16-bit query keeps its dtype; float32 runs as tf32 on GPU.
    FP8 (e4m3) values under a bfloat16 query multiply in float16: e4m3 becomes float16 in one conversion per two
    values (to bfloat16 it takes several), both exactly; the kernel keeps the query and the probabilities in
    float16's range (:func:`f16_headroom`, the block's largest value scale)."""
    q_dtype = jnp.dtype(q_dtype)
    if q_dtype == jnp.dtype(jnp.bfloat16) and jnp.dtype(values_dtype) == jnp.dtype(jnp.float8_e4m3fn):
        return jnp.dtype(jnp.float16)
    return q_dtype if q_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.dtype(jnp.float32)


def f16_headroom(peak):
    """``(down, up)``: powers of two (exact float32 scalars) with ``peak * down < 2**15`` (float16 holds up to
    65504) and ``up = 1 / down``; ``down`` is 1 for a ``peak`` below ``2**15``. From the exponent bits: no
    logarithm, no rounding."""
    exponent = lax.shift_right_logical(lax.bitcast_convert_type(peak, jnp.int32), 23) & 0xFF
    shift = jnp.maximum(exponent - (127 + 14), 0)
    as_float = lambda e: lax.bitcast_convert_type(lax.shift_left(e, 23), jnp.float32)
    return as_float(127 - shift), as_float(127 + shift)


def wide_rows(group: int, chunks: int) -> int:
    """Query rows per chunk in the wide products: a power of two >= ``group`` with ``chunks * rows >= 16``."""
    return max(1 << (group - 1).bit_length(), -(-MIN_BLOCK // chunks))


def permute_columns(x, lanes: int, inverse: bool = False):
    """``x [M, D]`` with its columns reordered: column ``t * lanes + c`` takes column ``c * T + t`` (``T = D //
    lanes``); ``inverse`` undoes it. In a product's ``[K, D]`` right operand over ``num_warps`` warps, whose column
    ``n`` a thread holds for ``n % (8 * num_warps)`` fixed, ``lanes = 8 * num_warps`` gives each thread ``T``
    adjacent columns of ``x``: one wide shared-memory read per row instead of one byte each."""
    m, d = x.shape
    if lanes >= d:
        return x
    split = (m, d // lanes, lanes) if inverse else (m, lanes, d // lanes)
    return x.reshape(split).transpose(0, 2, 1).reshape(m, d)


def lane_chunk_bits(rows: int, chunks: int) -> int:
    """Bits of the row block index ``k = r // rows`` of a wide row ``r`` that fall among the low three bits of
    ``r``: those a 16-row product tile spreads over lanes (the rest are a thread's registers). The "srot" form
    gives row block ``k`` chunk ``sigma(k)`` (``k`` rotated right by these bits), so the chunks one thread's rows
    hold are adjacent and their scales one wider shared-memory read per key."""
    return min(max(0, 3 - (rows.bit_length() - 1)), chunks.bit_length() - 1)
