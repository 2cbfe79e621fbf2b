"""Q8 codes times scales written out as a floating array, as one Pallas kernel (for callers that need the
values, e.g. a dequantized copy for the bf16 decode kernel; the Q8 attention kernels dequantize in their loads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int8

from pallas_kernels import backend, checks, common
from pallas_kernels.checks import Q8_BLOCK as QBLOCK
from pallas_kernels.checks import check_q8

OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEQUANT_BLOCK_ROWS = 256  # rows of D values per dequant program (32 KiB of int8 codes at D = 128)


def out_dtype(dtype) -> jnp.dtype:
    """``dtype`` as one of ``OUT_DTYPES``, or a ``TypeError`` naming it."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {dtype!r}") from e
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {dtype}")
    return dtype


def _dequant_kernel(
    # inputs
    codes_ref,  # [R, D] int8: the whole array
    scales_ref,  # [R, D // 32]
    # outputs
    out_ref,  # [R, D]
    *,
    block_rows: int,
):
    rows, head_dim = codes_ref.shape
    # The last program's window slides back to end at R: its overlap rewrites the same values.
    start = jnp.minimum(pl.program_id(0) * block_rows, rows - block_rows)
    window = pl.ds(start, block_rows)
    for c in range(head_dim // QBLOCK):
        chunk = pl.ds(c * QBLOCK, QBLOCK)
        codes = codes_ref[window, chunk].astype(jnp.float32)  # [br, 32]
        scale = scales_ref[window, c].astype(jnp.float32)  # [br]
        out_ref[window, chunk] = (codes * scale[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "block_rows", "interpret"))
def _dequantize(codes, scales, *, dtype, block_rows: int, interpret: bool):
    # codes [R, D] int8; scales [R, D // 32]
    rows, head_dim = codes.shape
    out_shape = jax.ShapeDtypeStruct((rows, head_dim), dtype)
    kernel = functools.partial(_dequant_kernel, block_rows=block_rows)
    launch = dict(grid=(pl.cdiv(rows, block_rows),), num_warps=4, num_stages=1, interpret=interpret)
    return common.whole_call(kernel, [codes, scales], out_shape, **launch, name="jkv_q8_dequantize")


def dequantize_q8(
    codes: Int8[Array, "... D"],
    scales: Float[Array, "... D//32"],
    *,
    dtype=jnp.bfloat16,
    interpret: bool | None = None,
    block_rows: int | None = None,
) -> Float[Array, "... D"]:
    """``codes * scales`` as ``dtype`` (bfloat16, float16 or float32), computed in float32.

    Every leading axis is flattened into rows of ``D`` values (free: the arrays are contiguous); one program
    writes ``block_rows`` rows (default 256, a power of two; fewer when the array has fewer rows).
    """
    check_q8("dequantize", codes, scales)
    dtype = out_dtype(dtype)
    interpret = backend.resolve_interpret(interpret)
    head_dim = codes.shape[-1]
    rows = int(np.prod(codes.shape[:-1]))
    if rows == 0:
        return jnp.zeros(codes.shape, dtype)
    if block_rows is None:
        block_rows = min(DEQUANT_BLOCK_ROWS, 1 << (rows.bit_length() - 1))  # largest power of two <= rows
    elif not checks.is_int(block_rows) or block_rows < 1 or block_rows & (block_rows - 1) or block_rows > rows:
        raise ValueError(f"{block_rows=} must be a power of two no larger than the number of rows ({rows})")
    out = _dequantize(
        codes.reshape(rows, head_dim),
        scales.reshape(rows, head_dim // QBLOCK),
        dtype=dtype,
        block_rows=int(block_rows),
        interpret=interpret,
    )
    return out.reshape(codes.shape)
