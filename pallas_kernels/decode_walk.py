"""What the Triton split-K decode kernel bodies share (``decode.decode_kernel``, which the paged kernel runs too,
and ``decode_q8.decode_kernel``): a program's range of blocks, its query tile, the walk over its blocks and the
store of its output or partials. Each body keeps its own ``attend`` (the products of one block)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common


def program_range(lengths_ref, layer_ref, b, j, shape, *, block_k: int, num_splits: int, window: int | None):
    """Program ``(b, ., j)``'s sequence length ``n``, layer, window start, first block and split ``[lo, hi)`` over
    a cache of ``shape`` ``[L, B, K, S, D]``."""
    num_layers, _, _, max_len, _ = shape
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.clip(lengths_ref[b], 0, max_len)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    start = common.window_start(n, window)  # the query at n - 1 sees positions start .. n - 1
    first = start // block_k  # blocks wholly before the window are never read
    lo, hi = common.split_blocks(n, j, block_k, num_splits, first)
    return n, layer, start, first, lo, hi


def query_tile(q_ref, b, h, *, group: int, rows: int, cols, stride: int | None = None):
    """This kv head's query heads, rows ``h*G .. h*G+G-1`` of ``q``, padded to ``rows`` (masked, zeros), in
    columns ``cols`` (a slice or ``pl.ds``; one reaching past ``D`` reads zeros there: a power-of-two tile over a
    head that is not one): ``(head_rows, row_ok, q [rows, W])``; ``row_ok``, the mask of the tile's real rows and
    columns (the output's store takes it too), is None without padding. ``stride``: rows of ``q`` a kv head takes
    (default ``G``; ``G + 2`` where its key and value rows follow its queries: ``decode.decode_attention_packed``),
    so its queries are rows ``h*stride ..``; ``head_rows`` is then the output's rows, ``h*G ..``."""
    head_rows = pl.ds(h * group, rows)
    width = q_ref.shape[-1] if isinstance(cols, slice) else cols.size
    row_ok = lax.broadcasted_iota(jnp.int32, (rows, width), 0) < group if rows != group else None
    col_ok = column_mask((rows, width), cols, q_ref.shape[-1])
    if col_ok is not None:
        row_ok = col_ok if row_ok is None else row_ok & col_ok
    q_rows = head_rows if stride is None else pl.ds(h * stride, rows)
    q = backend.load(q_ref.at[b, q_rows, cols], mask=row_ok, other=0 if row_ok is not None else None)
    return head_rows, row_ok, q


def past_columns(cols, width: int) -> bool:
    """Whether ``cols`` (``:`` or a static ``pl.ds``) reaches past a row of ``width`` columns."""
    return not isinstance(cols, slice) and cols.start + cols.size > width


def column_mask(shape, cols, width: int):
    """For a tile of ``shape`` read at columns ``cols`` of rows of ``width``: the mask of its columns inside the
    rows (a power-of-two tile over rows that are not), or None where ``cols`` stays inside (:func:`past_columns`)."""
    if not past_columns(cols, width):
        return None
    return lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < width - cols.start


def read_columns(ref, index, cols):
    """``ref[*index, cols]``, the columns past the rows (:func:`column_mask`) read as zeros, never from memory."""
    if not past_columns(cols, ref.shape[-1]):
        return ref[(*index, cols)]
    tile = ref.at[(*index, cols)]
    zero = 0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0  # Triton casts no integer to float8
    return backend.load(tile, mask=column_mask(tile.shape, cols, ref.shape[-1]), other=zero)


def block_ref(ref, valid):
    """The ref a block's reads go through: for a whole block (``valid`` None: every row inside the window and the
    length) a paged view's unmasked form (``paged.PagedView.whole_rows``); else ``ref`` itself."""
    return ref.whole_rows() if valid is None and hasattr(ref, "whole_rows") else ref


def block_tile(ref, valid, index, cols):
    """A block's tile ``ref[*index, cols]`` read through :func:`block_ref` (``index`` ends with the block's
    ``pl.ds`` of positions); columns past the rows' own (:func:`past_columns`) read as zeros. A paged view masks
    them itself."""
    ref = block_ref(ref, valid)
    return ref[(*index, cols)] if hasattr(ref, "whole_rows") else read_columns(ref, index, cols)


def walk(attend, rows: int, acc_shapes, *, n, n_full, start, first, lo, hi, block_k: int, max_len: int, window,
         new_pos=None, denom_shape=None):  # fmt: skip
    """Run ``attend(carry, at, valid[, new_row])`` over the split's blocks ``[lo, hi)`` from the online softmax's
    start (running max ``-inf`` and denominator 0 ``[rows]`` (or ``denom_shape``), ``acc`` a tuple of zeros of
    ``acc_shapes``, one per column chunk; float32): the
    window's first block masked where the window starts inside it, whole blocks (below ``n_full``) unmasked, the
    tail block masked (slid back to stay inside ``S``; with ``new_pos``, ``new_row`` marks that position).
    Returns the final ``(m, denom, acc)`` and whether this split ran the tail."""

    def full_block(i, carry):
        return attend(carry, pl.multiple_of(i * block_k, block_k), None)

    def head_block(carry):  # the window's first block when it starts inside it: the earlier positions masked
        at = pl.multiple_of(first * block_k, block_k)
        return attend(carry, at, at + lax.broadcasted_iota(jnp.int32, (block_k,), 0) >= start)

    def tail_block(carry):
        at = n_full * block_k
        slid = jnp.minimum(at, max_len - block_k)  # slide back so the load stays inside S
        pos = slid + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid = (pos >= (at if window is None else jnp.maximum(at, start))) & (pos < n)
        return attend(carry, slid, valid) if new_pos is None else attend(carry, slid, valid, pos == new_pos)

    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros(denom_shape or (rows,), jnp.float32),
        tuple(jnp.zeros(x, jnp.float32) for x in acc_shapes),
    )
    full_lo = lo
    if window is not None:  # the head block runs masked (unless the tail holds the window's start)
        has_head = (lo == first) & (first < n_full) & (start > first * block_k)
        carry = lax.cond(has_head, head_block, lambda c: c, carry)
        full_lo = lo + has_head.astype(jnp.int32)
    carry = lax.fori_loop(full_lo, jnp.minimum(hi, n_full), full_block, carry)
    has_tail = (lo <= n_full) & (n_full < hi)
    return lax.cond(has_tail, tail_block, lambda c: c, carry), has_tail


def store(out_refs, acc, m, denom, b, j, head_rows, cols, row_ok, *, group: int, rows: int, num_splits: int):
    """With one split, the normalised output ``o [B, N, D]``; with several, this split's partials ``acc``, ``m``,
    ``denom`` (``common.split_out_shape``); padding rows are never stored. ``acc`` and ``cols``: one accumulator and
    its columns per column chunk (``common.column_tiles``)."""
    vec_ok = None if row_ok is None else lax.broadcasted_iota(jnp.int32, (rows,), 0) < group
    chunks = list(zip(acc, cols, strict=True))

    def ok(part):  # the row mask in this chunk's width (chunks may differ in width)
        if row_ok is None or part.shape == row_ok.shape:
            return row_ok
        return lax.broadcasted_iota(jnp.int32, part.shape, 0) < group

    if num_splits == 1:
        (o_ref,) = out_refs
        inv = common.inverse_or_zero(denom)  # length 0: zeros
        for part, at in chunks:
            backend.store(o_ref.at[b, head_rows, at], (part * inv[:, None]).astype(o_ref.dtype), mask=ok(part))
        return
    acc_ref, m_ref, denom_ref = out_refs[:3]
    for part, at in chunks:
        backend.store(acc_ref.at[b, j, head_rows, at], part, mask=ok(part))
    backend.store(m_ref.at[b, j, head_rows], m, mask=vec_ok)
    backend.store(denom_ref.at[b, j, head_rows], denom, mask=vec_ok)
