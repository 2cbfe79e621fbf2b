"""Causal attention of several new tokens per sequence over a KV cache: prefill, chunked prefill, speculative
verification and the mixed serving step (issue 20; the interface: the docstring of :func:`multi_token_attention`).

Shapes: a flat batch of query tokens ``q [T, N, D]``, sequence ``b``'s ``counts[b]`` queries in rows
``q_starts[b] ..`` at positions ``lengths[b] ..``; the cache already holds the step's new K/V. Query head ``n``
reads kv head ``n // G`` (``G = N // K``); softmax in float32; output in ``q.dtype``, 0 in rows no sequence owns.

The kernel (Triton lowering on GPU, interpret mode elsewhere; ``pallas_kernels.backend``), flash-attention style:

* a program owns a tile of ``block_q`` query tokens of one sequence times the ``G`` query heads of one kv head
  (``rows = block_q * G`` padded to a power of two >= 16, Triton's smallest dot), so each K/V block it loads
  serves all of them; the tile table (sequence, first query) comes from ``counts`` in XLA (:func:`tile_table`);
  the grid is static, ``(tiles, K)``, and programs past the live tiles run no loop and store nothing;
* the key loop runs from the first query's window start (rounded down to ``block_k``) to the last query's
  position with an online softmax, never a ``T x S`` score matrix; blocks every row reads whole (at or below
  the first query's position and inside the last query's window) run unmasked, the others mask scores per row
  and zero the V rows (or the V scales) that no query reads, so NaN anywhere else never reaches the output;
* the cache is passed whole and indexed in place (``layer`` may be traced); paged pools go through the block
  table (:class:`PagedBlocks`: one load per block when a page holds whole blocks, a row gather otherwise);
* Q8 and FP8 caches are dequantized inside the products: scores of each 32-value Q8 chunk are weighted by its
  K scales, probabilities by the V scales (FP8: one scale per position, applied to the whole row).

Launch parameters: ``pallas_kernels.multi_token_args.multi_token_config``. The other kinds' public functions:
``pallas_kernels.multi_token_paged`` (paged Plain), ``pallas_kernels.multi_token_quant`` (Q8 and FP8, both
layouts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, checks, common, formats, q8_tiles
from pallas_kernels.common import LOG2E, MIN_BLOCK
from pallas_kernels.multi_token_args import (
    MultiTokenConfig,
    check_args,
    multi_token_config,
    resolve_config,
    tile_rows,
)

PLAIN, Q8, FP8 = "plain", "q8", "fp8"


def chunk_width(fmt: str, head_dim: int) -> int:
    """Columns per product: a Q8 scale block (32), else the largest power of two dividing ``D`` (all of it for a
    power of two; 32 for D = 96), since Triton tiles are powers of two."""
    return formats.Q8_BLOCK if fmt == Q8 else head_dim & -head_dim


# ----------------------------------------------------------------------------------------------- K/V blocks


class ContiguousBlocks:
    """Block ``[start, start + block_k)`` of a contiguous cache ``[L, B, K, S, X]``. A block that runs past ``S``
    slides back to end at ``S`` (its positions below ``start`` are masked by the caller), so ``S >= block_k``."""

    def __init__(self, max_len: int, block_k: int):
        self.max_len, self.block_k = max_len, block_k

    def address(self, b, start, masked: bool):
        first = jnp.minimum(start, self.max_len - self.block_k) if masked else pl.multiple_of(start, self.block_k)
        return (b, first), first + lax.broadcasted_iota(jnp.int32, (self.block_k,), 0)

    def load(self, ref, layer, address, h, cols):
        b, first = address
        return ref[layer, b, h, pl.ds(first, self.block_k), cols]  # [bk, W], or [bk] for an int column


class PagedBlocks:
    """Block ``[start, start + block_k)`` of sequence ``b`` through its block table, from pools
    ``[L, P, K, page_size, X]`` (``pallas_kernels.paged.PagedView``'s idea). Page indices are clipped into the
    pool, so every load is in bounds: entries without a page only cover positions the caller masks."""

    def __init__(self, tables_ref, num_pages: int, page_size: int, block_k: int):
        self.tables, self.num_pages, self.page_size, self.block_k = tables_ref, num_pages, page_size, block_k
        self.one_page = page_size % block_k == 0  # a block lies inside one page: a contiguous load

    def address(self, b, start, masked: bool):
        del masked
        ps, max_pages = self.page_size, self.tables.shape[1]
        pos = start + lax.broadcasted_iota(jnp.int32, (self.block_k,), 0)
        if self.one_page:
            # lax.div / lax.rem: start >= 0, and Triton lowers jnp's signed % of scalars wrongly
            page = self.tables[b, jnp.minimum(lax.div(start, ps), max_pages - 1)]
            offset = pl.multiple_of(lax.rem(start, ps), self.block_k)
            return (jnp.clip(page, 0, self.num_pages - 1), offset), pos
        pages = self.tables[b, jnp.minimum(pos // ps, max_pages - 1)]  # [bk]: repeated entries hit the cache
        return (jnp.clip(pages, 0, self.num_pages - 1), pos % ps), pos

    def load(self, ref, layer, address, h, cols):
        pages, offsets = address
        if self.one_page:
            return ref[layer, pages, h, pl.ds(offsets, self.block_k), cols]
        if isinstance(cols, int):  # one column (a scale) per position: [bk]
            return backend.load(ref.at[layer, pages, h, offsets, cols])
        columns = cols.start + lax.broadcasted_iota(jnp.int32, (1, cols.size), 1)
        return backend.load(ref.at[layer, pages[:, None], h, offsets[:, None], columns])  # [bk, W]


# ----------------------------------------------------------------------------------------------- kernel


def multi_token_kernel(
    # inputs
    tiles_ref,  # [2, NT] int32: each tile's sequence (-1: no tile) and its first query within the sequence
    q_starts_ref,  # [B] int32
    lengths_ref,  # [B] int32
    counts_ref,  # [B] int32
    layer_ref,  # [1] int32
    # then: tables [B, M] int32 (paged only); q [T, N, D]; the cache's arrays, whole: k, v [L, B, K, S, D]
    # (paged: [L, P, K, page_size, D]), or k, k_scale, v, v_scale for Q8 / FP8; zeros [T + spare, N, D];
    # outputs: o [T + spare, N, D] (aliased to the zeros: rows no tile stores stay 0; spare rows in interpret
    # mode only, rows // G + 1)
    *refs,
    paged: bool,
    fmt: str,
    group: int,
    rows: int,
    block_q: int,
    block_k: int,
    chunk: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    dot_dtype,
    precision,
):
    if paged:
        tables_ref, *refs = refs
    q_ref, *cache, _, o_ref = refs
    k_ref, ks_ref, v_ref, vs_ref = cache if fmt != PLAIN else (cache[0], None, cache[1], None)
    if paged:
        blocks = PagedBlocks(tables_ref, k_ref.shape[1], k_ref.shape[3], block_k)
        max_len = tables_ref.shape[1] * k_ref.shape[3]
    else:
        max_len = k_ref.shape[3]
        blocks = ContiguousBlocks(max_len, block_k)
    tokens, _, head_dim = q_ref.shape
    chunks = head_dim // chunk
    i, h = pl.program_id(0), pl.program_id(1)
    seq, first = tiles_ref[0, i], tiles_ref[1, i]
    b = jnp.maximum(seq, 0)
    # The step's values were validated on the host when concrete; the clamps only keep traced ones in bounds.
    layer = jnp.clip(layer_ref[0], 0, k_ref.shape[0] - 1)
    length = jnp.clip(lengths_ref[b], 0, max_len)
    most = jnp.minimum(counts_ref[b] - first, jnp.minimum(block_q, max_len - length - first))
    n_q = jnp.where(seq >= 0, jnp.maximum(most, 0), 0)  # live queries in this tile
    p_first = length + first
    p_last = p_first + n_q - 1

    # Row r of the tile is query token r // G (of the tile) and query head h * G + r % G.
    r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
    tok = r // group
    row_ok = tok < n_q
    row_pos = p_first + jnp.minimum(tok, jnp.maximum(n_q - 1, 0))  # padding rows mirror the last query
    q_row = jnp.clip(q_starts_ref[b] + first + tok, 0, tokens - 1)
    # Interpret mode: rows without a query store (masked) into spare rows past T, so no element is named twice in
    # one store (interpret mode resolves that arbitrarily); a GPU never writes a masked lane.
    o_row = jnp.where(row_ok, q_row, tokens + tok) if o_ref.shape[0] > tokens else q_row
    head = h * group + r % group
    tile_ok = jnp.broadcast_to(row_ok[:, None], (rows, chunk))

    def rows_at(row, c):  # the tile's elements of q / o in columns [c * chunk, (c + 1) * chunk)
        return row[:, None], head[:, None], c * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)

    qs = [backend.load(q_ref.at[rows_at(q_row, c)], mask=tile_ok, other=0).astype(dot_dtype) for c in range(chunks)]

    # Scores in base-2 units (log2(e) folded into the scale, after the softcap where there is one): the softmax
    # exponentials are the hardware's exp2 (decode.py's body does the same).
    score_factor = scale * LOG2E if softcap is None else scale

    def column(ref, address, c):  # one scale per position: [bk] float32
        return blocks.load(ref, layer, address, h, c).astype(jnp.float32)

    def scores_of(address):  # [rows, bk] float32
        s = 0.0
        for c in range(chunks):
            k = blocks.load(k_ref, layer, address, h, pl.ds(c * chunk, chunk)).astype(dot_dtype)  # [bk, W]
            part = common.dot(qs[c], k, trans_b=True, precision=precision)
            s = s + (part * column(ks_ref, address, c)[None, :] if fmt == Q8 else part)
        if fmt == FP8:
            s = s * column(ks_ref, address, 0)[None, :]
        return s * score_factor

    def values_of(p, address, keep):  # [rows, W] per chunk; keep [bk]: positions some row reads (None: all)
        if fmt == FP8:
            v_scale = column(vs_ref, address, 0)
            p = p * (v_scale if keep is None else jnp.where(keep, v_scale, 0.0))[None, :]
        out = []
        for c in range(chunks):
            v = blocks.load(v_ref, layer, address, h, pl.ds(c * chunk, chunk)).astype(dot_dtype)  # [bk, W]
            pc = p
            if fmt == Q8:  # codes are finite: the scales carry the mask
                v_scale = column(vs_ref, address, c)
                pc = p * (v_scale if keep is None else jnp.where(keep, v_scale, 0.0))[None, :]
            elif keep is not None:
                v = jnp.where(keep[:, None], v, jnp.zeros_like(v))  # unread positions may hold NaN: 0 * NaN
            out.append(common.dot(pc.astype(dot_dtype), v, precision=precision))
        return out

    k_lo = 0 if window is None else jnp.maximum(p_first - window + 1, 0)  # the first query's window start

    def attend(j, carry, masked: bool):
        m, denom, *acc = carry  # running max [rows], softmax denominator [rows], output chunks [rows, W]
        start = j * block_k
        address, pos = blocks.address(b, start, masked)
        s = scores_of(address)
        if softcap is not None:  # on natural units, then to base 2
            s = softcap * jnp.tanh(s / softcap) * LOG2E
        keep = None
        if masked:
            keep = (pos >= start) & (pos >= k_lo) & (pos <= p_last)
            ok = keep[None, :] & (pos[None, :] <= row_pos[:, None])
            if window is not None:
                ok = ok & (pos[None, :] > row_pos[:, None] - window)
            s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has read no position yet keeps m = -inf: shift by 0 so exp2 gives 0, never NaN.
        shift = jnp.where(m_new > -jnp.inf, m_new, 0.0) if masked else m_new
        alpha = jnp.exp2(m - shift)
        p = jnp.exp2(s - shift[:, None])
        acc = [a * alpha[:, None] + pv for a, pv in zip(acc, values_of(p, address, keep), strict=True)]
        return (m_new, denom * alpha + jnp.sum(p, axis=1), *acc)

    lo = k_lo // block_k
    hi = jnp.where(n_q > 0, p_last // block_k + 1, lo)
    # Unmasked blocks: every position at or below the first query and inside the last query's window.
    full_lo = lo if window is None else pl.cdiv(jnp.maximum(p_last - window + 1, 0), block_k)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip((p_first + 1) // block_k, full_lo, hi)
    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        *(jnp.zeros((rows, chunk), jnp.float32) for _ in range(chunks)),
    )
    carry = lax.fori_loop(lo, full_lo, lambda j, c: attend(j, c, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda j, c: attend(j, c, False), carry)
    _, denom, *acc = lax.fori_loop(full_hi, hi, lambda j, c: attend(j, c, True), carry)
    inv = common.inverse_or_zero(denom)
    for c in range(chunks):
        backend.store(o_ref.at[rows_at(o_row, c)], (acc[c] * inv[:, None]).astype(o_ref.dtype), mask=tile_ok)


def tile_table(counts: Int[Array, " B"], block_q: int, num_tiles: int) -> Int[Array, "2 NT"]:
    """Tiles of ``block_q`` queries, last first (a sequence's later tiles read more keys: launched first, they
    leave the short ones to fill the end): row 0 the sequence (-1 past the live tiles), row 1 the tile's first
    query within its sequence."""
    per = -(-jnp.maximum(counts, 0) // block_q)  # tiles of each sequence
    ends = jnp.cumsum(per)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    live = i < ends[-1]
    i = jnp.where(live, ends[-1] - 1 - i, i)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right"), counts.shape[0] - 1)
    first = (i - (ends - per)[seq]) * block_q
    return jnp.stack([jnp.where(live, seq, -1), jnp.where(live, first, 0)]).astype(jnp.int32)


def num_tiles(tokens: int, batch: int, block_q: int) -> int:
    """Grid rows: enough for any counts summing to at most ``T`` (each sequence wastes less than one tile)."""
    return max(1, min(pl.cdiv(tokens, block_q) + batch - 1, tokens))


@functools.partial(jax.jit, static_argnames=("fmt", "scale", "window", "softcap", "config", "interpret"))
def _launch(q, cache, tables, q_starts, lengths, counts, layer, *, fmt, scale, window, softcap, config, interpret):
    # q [T, N, D]; cache: (k, v) or (k, k_scale, v, v_scale), each [L, B, K, S, X] or [L, P, K, page_size, X];
    # tables int32[B, M] or None; q_starts, lengths, counts int32[B]; layer int32[1]
    tokens, num_heads, head_dim = q.shape
    kv_heads = cache[0].shape[2]
    group = num_heads // kv_heads
    grid = (num_tiles(tokens, q_starts.shape[0], config.block_q), kv_heads)
    tiles = tile_table(counts, config.block_q, grid[0])
    if fmt == PLAIN:  # products in the cache dtype (as the decode kernel), float32 ones at the highest precision
        dot_dtype = cache[0].dtype
        precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    else:
        dot_dtype, precision = q8_tiles.dot_dtype_for(q.dtype), None
    kernel = functools.partial(
        multi_token_kernel,
        paged=tables is not None,
        fmt=fmt,
        group=group,
        rows=tile_rows(config.block_q, group),
        block_q=config.block_q,
        block_k=config.block_k,
        chunk=chunk_width(fmt, head_dim),
        scale=scale,
        window=window,
        softcap=softcap,
        dot_dtype=dot_dtype,
        precision=precision,
    )
    inputs = [tiles, q_starts, lengths, counts, layer, *([] if tables is None else [tables]), q, *cache]
    spare = tile_rows(config.block_q, group) // group + 1 if interpret else 0
    out_shape = (tokens + spare, num_heads, head_dim)
    inputs.append(jnp.zeros(out_shape, q.dtype))
    name = f"jkv_multi_token_{fmt}" + ("_paged" if tables is not None else "")
    launch = dict(grid=grid, num_warps=config.num_warps, num_stages=config.num_stages, interpret=interpret)
    out_struct = jax.ShapeDtypeStruct(out_shape, q.dtype)
    out = common.whole_call(kernel, inputs, out_struct, **launch, name=name, aliases={len(inputs) - 1: 0})
    return out[:tokens] if spare else out


def run(
    q, cache, block_tables, q_starts, lengths, counts, dims, *, fmt, layer, scale, window, softcap, config, interpret
):
    """Resolve the launch settings of a checked call (``dims`` from ``check_args``) and launch; shared by every
    public function (this module, ``multi_token_paged``, ``multi_token_quant``)."""
    interpret = backend.resolve_interpret(interpret)
    scale = checks.softmax_scale(scale, dims.head_dim)
    itemsize = jnp.dtype(cache[0].dtype).itemsize
    default = multi_token_config(dims.num_heads, dims.kv_heads, dims.head_dim, cache[0].dtype, max_len=dims.max_len)
    config = resolve_config(config, default, dims.head_dim, itemsize)
    config = config._replace(block_q=max(1, min(config.block_q, dims.tokens)))  # no tile longer than the batch
    if block_tables is None and config.block_k > max(dims.max_len, MIN_BLOCK):
        raise ValueError(
            f"config.block_k={config.block_k} must be <= max(S, {MIN_BLOCK})={max(dims.max_len, MIN_BLOCK)}"
        )
    if dims.tokens == 0 or dims.batch == 0:  # no query, or no sequence to own one
        return jnp.zeros(q.shape, q.dtype)
    # A contiguous cache shorter than one block is padded to one (a copy of a tiny cache).
    cache, layer = common.whole_cache(cache, layer, config.block_k if block_tables is None else None)
    ints = lambda x: jnp.asarray(x).astype(jnp.int32)
    tables = None if block_tables is None else ints(block_tables)
    options = dict(fmt=fmt, scale=scale, window=window, softcap=None if softcap is None else float(softcap))
    return _launch(
        q, tuple(cache), tables, ints(q_starts), ints(lengths), ints(counts), layer,
        **options, config=config, interpret=interpret,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- public


def multi_token_attention(
    q: Float[Array, "T N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MultiTokenConfig | None = None,
    interpret: bool | None = None,
) -> Float[Array, "T N D"]:
    """Causal attention of a flat batch of query tokens over a contiguous cache (bf16 / f16 / f32).

    Query ``i < counts[b]`` of sequence ``b`` is row ``q_starts[b] + i`` of ``q``, at position
    ``p = lengths[b] + i``; it attends to positions ``max(0, p - window + 1) <= s <= p`` of ``k``/``v``
    (``[B, K, S, D]``, or a whole ``[L, B, K, S, D]`` cache with ``layer``, an int or a traced int32 scalar),
    which already hold the step's new K/V. ``softcap`` c: scores ``c * tanh(scale * q.k / c)``. ``scale``
    defaults to ``D ** -0.5``. Rows no sequence owns come out 0; positions no query reads may hold anything,
    NaN included. ``config`` overrides ``multi_token_config`` (pass ``multi_token_config(..., max_count=...)``
    when every sequence brings few queries, as in speculative verification); ``interpret=None`` runs interpret
    mode off GPU. The padded form ``q [B, Tpad, N, D]`` is ``q.reshape(B * Tpad, N, D)`` with
    ``q_starts = b * Tpad``.

    Example (a prompt of 5 tokens after 3 cached ones, and one decode token of another sequence)::

        out = multi_token_attention(q, k, v, q_starts=jnp.array([0, 5]), lengths=jnp.array([3, 9]),
                                    counts=jnp.array([5, 1]))  # q [6, N, D]
    """
    options = dict(layer=layer, window=window, softcap=softcap)
    dims = check_args(q, k, v, q_starts, lengths, counts, **options)
    return run(q, (k, v), None, q_starts, lengths, counts, dims, fmt=PLAIN, scale=scale, config=config,
               interpret=interpret, **options)  # fmt: skip
