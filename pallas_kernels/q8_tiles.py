"""The tiles of the Q8 / FP8 decode body (``decode_q8.decode_kernel``): its products' dtype and float16's range,
how many query rows a chunk's row block takes, the ``vperm`` form's column order of the value tile, the
``srot`` form's order of the row blocks' chunks, and a head's power-of-two column parts (:class:`ColumnPart`)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import MIN_BLOCK, pow2_ceil


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
    return max(pow2_ceil(group), -(-MIN_BLOCK // chunks))


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


def head_chunks(head_dim: int, chunk: int) -> int:
    """Row blocks the wide products give a head of ``head_dim`` at ``chunk`` values per scale, for
    :func:`wide_rows`: its scale chunks (1 for FP8's one scale a position), a head that is not a power of two
    counted as the next power of two (its narrower column parts split their chunks, :class:`ColumnPart`)."""
    return 1 if chunk >= head_dim else pow2_ceil(head_dim) // chunk


class ColumnPart:
    """One power-of-two column part of a Q8 / FP8 head (``common.column_slices``: the whole head at a power of
    two, else 64 + 32 for 96, ...) in the decode body's wide products: its columns, the scale chunks it spans and
    its row blocks (row ``c * rows + g`` holds query ``g``'s chunk ``c``, or ``sigma(c)`` with ``rotate``)."""

    def __init__(self, cols, head_dim: int, chunk: int, rows: int, srot: bool):
        whole = isinstance(cols, slice)
        self.cols = cols  # the K / V loads' columns
        self.width = head_dim if whole else cols.size
        scales = 1 if chunk >= head_dim else self.width // chunk  # FP8: one scale a position, every part
        self.scale_cols = slice(None) if whole or chunk >= head_dim else pl.ds(cols.start // chunk, scales)
        # A part narrower than the products' 16 rows need (32 of 96 at 4 query rows) splits each scale chunk into
        # ``repeat`` row blocks of its columns, sharing the chunk's scale: the rows stay those of the whole head.
        self.chunks = max(scales, -(-MIN_BLOCK // rows))
        self.repeat = self.chunks // scales
        sub = self.width // self.chunks  # columns a row block holds
        self.rows, self.wide_rows = rows, self.chunks * rows
        self.rotate = lane_chunk_bits(rows, self.chunks) if srot else 0
        iota = lambda dim: lax.broadcasted_iota(jnp.int32, (self.wide_rows, self.width), dim)
        block = iota(0) // rows  # row block k holds chunk k, or its rotation sigma(k)
        if self.rotate:
            block = block % (1 << self.rotate) * (self.chunks >> self.rotate) + block // (1 << self.rotate)
        self.diag = block == iota(1) // sub if self.chunks > 1 else None  # [R, W]: row block k's own columns

    def chunk_order(self, x):
        """``x [scale chunks, bk]`` (a block's scales) as ``[chunks, bk]`` in the row blocks' order of chunks."""
        if self.repeat > 1:  # each scale for each of its chunk's row blocks
            x = jnp.broadcast_to(x[:, None], (x.shape[0], self.repeat, x.shape[1])).reshape(self.chunks, x.shape[1])
        if not self.rotate:
            return x
        r, c = self.rotate, self.chunks
        return x.reshape(1 << r, c >> r, x.shape[1]).transpose(1, 0, 2).reshape(x.shape)

    def widen(self, x):
        """``[rows, ...] -> [chunks * rows, ...]``: row ``c * rows + g`` is ``x[g]``."""
        if self.chunks == 1:
            return x
        return jnp.broadcast_to(x[None], (self.chunks, *x.shape)).reshape(self.wide_rows, *x.shape[1:])

    def block_diagonal(self, x):
        """``x [rows, W]`` widened with zeros outside each row block's own chunk: the wide products' left operand."""
        return x if self.chunks == 1 else jnp.where(self.diag, self.widen(x), jnp.zeros(self.diag.shape, x.dtype))

    def own_chunks(self, acc):
        """The wide accumulator ``[R, W]`` folded to ``[rows, W]``: each row block's own chunk's columns."""
        if self.chunks == 1:
            return acc
        return jnp.sum(jnp.where(self.diag, acc, 0.0).reshape(self.chunks, self.rows, self.width), axis=0)
