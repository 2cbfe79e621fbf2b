"""The layouts of the Q8 decode body's wide tiles (``decode_q8.decode_kernel``): how many query rows a chunk's
row block takes, the ``vperm`` form's column order of the value tile and the ``srot`` form's order of the row
blocks' chunks."""

from __future__ import annotations

from pallas_kernels.common import MIN_BLOCK


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
