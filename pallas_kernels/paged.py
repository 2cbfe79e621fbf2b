"""Single-query GQA decode attention over a paged KV cache, reading K/V through the block table (split-K).

Shapes: ``q [B, N, D]``; page pools ``k_pages``, ``v_pages`` either one layer ``[P, K, page_size, D]`` or all
layers ``[L, P, K, page_size, D]`` with a ``layer`` index (a Python int or a traced int32 scalar);
``block_tables int32[B, M]`` names the physical page of each logical page (``< 0``: none); ``lengths int[B]``
counts the valid leading positions of each sequence (0 gives a zero output). Position ``s`` of sequence ``b`` is
row ``s % page_size`` of page ``block_tables[b, s // page_size]``. Query head ``n`` reads kv head ``n // G``.

One kernel body for both caches: the paged kernel runs ``pallas_kernels.decode``'s kernel body (grid
``(b, kv head, split)``, ragged lengths, GQA query tile, split-K, launch rules) unchanged, over a
:class:`PagedView` of the pools in place of the contiguous cache ref. The view presents the logical
``[L, B, K, M * page_size, D]`` cache and turns each block read ``k[layer, b, h, start : start + block_k]`` into

* one load of the block's page indices from the block table, which reaches the kernel as an int ref (no XLA
  gather ever assembles a sequence), then
* one gathered load of those pages straight from the pool (each page row a contiguous run of ``D`` values),
  masked by row in the walk's masked blocks (the window's first and the tail) so that rows past the sequence's
  length, and pages past those its table covers, are never read (they may hold NaN or belong to another
  sequence); the blocks between, every row valid, load unmasked (:meth:`PagedView.whole_rows`).

A block is therefore whole pages: ``block_k = pages_per_block * page_size``. The Q8 pages of
``pallas_kernels.paged_q8`` read through the same view.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, checks, common, decode, decode_walk
from pallas_kernels.common import MIN_BLOCK


class PagedConfig(NamedTuple):
    """Launch parameters of a paged kernel (static: each distinct value compiles its own kernel)."""

    pages_per_block: int  # pages (consecutive table entries) per loop step
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int
    preload: bool = False  # read the split's table entries once, before its loop (see preload_entries)
    fused_merge: bool = False  # the last split merges (common.DecodeConfig)


PRELOAD_MAX = 64  # most table entries a program holds in registers when its split's entries are preloaded
# Preload only where a split walks at most this many positions: such a split is one burst of loads, where a
# table read inside it is exposed latency; longer splits pipeline their in-loop reads (docs/notes/kernel_rules.md).
PRELOAD_KEYS = 256


def preload_entries(max_pages: int, pages_per_block: int, num_splits: int, page_size: int) -> int:
    """Table entries a program loads before its loop when preloading: a power of two covering the most blocks a
    split can walk, ``ceil(ceil(max_pages / ppb) / splits) * ppb``; 0 when a split may walk more than
    ``PRELOAD_KEYS`` positions or the entries exceed ``PRELOAD_MAX`` or the (padded) table itself, and the
    entries are then read block by block inside the loop."""
    padded = -(-max_pages // pages_per_block) * pages_per_block
    most = -(-(padded // pages_per_block) // num_splits) * pages_per_block
    width = 1 << (most - 1).bit_length()
    return width if most * page_size <= PRELOAD_KEYS and width <= min(PRELOAD_MAX, padded) else 0


def paged_config(
    batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int, dtype, **kwargs
) -> PagedConfig:
    """Defaults: the contiguous kernel's block of keys (rounded to whole pages), splits, warps and stages."""
    max_len = max_pages * page_size
    base = common.decode_config(batch, num_kv_heads, max_len, head_dim, dtype, **kwargs)
    ppb = max(1, base.block_k // page_size, MIN_BLOCK // page_size)
    block_k = ppb * page_size
    splits = common.choose_num_splits(batch, num_kv_heads, max_len, block_k, **kwargs)
    stages = min(base.num_stages, common.tile_max_stages(block_k, head_dim, jnp.dtype(dtype).itemsize))
    preload = preload_entries(max_pages, ppb, splits, page_size) > 0
    return PagedConfig(ppb, splits, base.num_warps, stages, preload)


def resolve_config(default: PagedConfig, page_size: int, head_dim: int, itemsize: int, **overrides) -> PagedConfig:
    """The default with the caller's overrides (``None`` keeps the default), validated; stages are capped so the
    resident K/V blocks fit in shared memory (``common.max_stages``)."""
    preload = checks.check_flag("preload", overrides.pop("preload", None))
    fused = checks.check_flag("fused_merge", overrides.pop("fused_merge", None))
    checks.check_launch_overrides(**overrides)
    ppb = overrides["pages_per_block"]
    if ppb is not None and (ppb < 1 or ppb & (ppb - 1) or ppb * page_size < MIN_BLOCK):
        raise ValueError(
            f"pages_per_block={ppb} must be a power of two with pages_per_block * {page_size=} >= {MIN_BLOCK}"
        )
    chosen = [overrides[f] for f in PagedConfig._fields[:4]] + [preload, fused]
    config = PagedConfig(*(d if o is None else type(d)(o) for d, o in zip(default, chosen, strict=True)))
    cap = common.tile_max_stages(config.pages_per_block * page_size, head_dim, itemsize)
    return config._replace(num_stages=min(config.num_stages, cap))


# ----------------------------------------------------------------------------------------------- page view


class PagedView:
    """Pools ``[L, P, K, page_size, D]`` seen as the contiguous ``[L, B, K, M * page_size, D]`` cache, inside a
    kernel: indexing with ``[layer, b, h, pl.ds(start, size), :]`` (``start`` and ``size`` multiples of
    ``page_size``) loads those positions through sequence ``b``'s block table.

    The block loads as a ``[size, D]`` tile whose row ``r`` reads table entry ``(start + r) // page_size``
    (repeated entries hit the cache): every index is an array (one gather, which interpret mode can run too) and
    the load is masked by row, so rows past the sequence's length are not read. The K and V views of one kernel
    (and the scale views of Q8 pages) share ``addresses``, so every read of a block after the first reuses the
    page indices it loaded. The last index is ``:`` (whole rows) or a static ``pl.ds`` of columns (a chunk of a
    head_dim read in power-of-two chunks, ``common.column_slices``; one reaching past ``D``, a power-of-two tile over
    rows that are not, reads zeros there).

    Page indices come from the block table in global memory, a read each block's K/V loads wait for; with
    :meth:`BlockAddresses.preload` they come from the split's entries loaded once before the loop (a one-hot
    select in registers), so no load inside the loop depends on another and the loop's loads pipeline as the
    contiguous kernel's do.
    """

    def __init__(self, pool_ref, addresses: BlockAddresses, masked: bool = True):
        self.pool, self.addresses, self.masked = pool_ref, addresses, masked
        num_layers, _, kv_heads, page_size, head_dim = pool_ref.shape
        batch, max_pages = addresses.tables.shape
        self.shape = (num_layers, batch, kv_heads, max_pages * page_size, head_dim)
        self.dtype = pool_ref.dtype

    def __getitem__(self, index):
        layer, b, h, window, cols = index
        if cols == slice(None):
            col0, width = 0, self.shape[4]
        elif isinstance(cols, pl.Slice) and isinstance(cols.start, int) and isinstance(cols.size, int):
            col0, width = cols.start, cols.size
        else:
            raise NotImplementedError(f"a paged view reads whole rows or static column chunks, got columns {cols}")
        pages, offsets, valid = self.addresses(b, window, width, col0)
        col_ok = decode_walk.column_mask((window.size, width), cols, self.shape[4])  # columns past the rows: zeros
        if not self.masked and col_ok is None:
            return self.pool[(layer, pages, h, *offsets)].reshape(window.size, width)
        if col_ok is not None:
            valid = valid & col_ok if self.masked else col_ok
        # A float zero for float pools: Triton's lowering casts no integer to float8.
        zero = 0.0 if jnp.issubdtype(self.dtype, jnp.floating) else 0
        x = backend.load(self.pool.at[(layer, pages, h, *offsets)], mask=valid, other=zero)
        return x.reshape(window.size, width)  # [bk, W]

    def whole_rows(self) -> PagedView:
        """This view for a block whose every row lies inside the sequence's window and length (the walk's
        unmasked blocks, ``decode_walk.block_ref``): those rows' pages exist, so the load goes unmasked. The row
        mask's predicates and selects were a fifth of the bf16 kernel's loop (``bench/decode_ir.py --paged``)."""
        return PagedView(self.pool, self.addresses, masked=False)


class BlockAddresses:
    """Page indices of one block, loaded once for all its reads, and its in-page offsets and row mask, built once
    per row width (``D`` for K/V values, ``D // 32`` for Q8 scales)."""

    def __init__(self, tables_ref, lengths_ref, num_pages: int, page_size: int, window: int | None = None):
        self.tables, self.lengths = tables_ref, lengths_ref
        self.num_pages, self.page_size, self.window = num_pages, page_size, window
        self._last = None  # (b, start, size, pages, {width: (offsets, valid)}) of the block last asked for
        self._entries = None  # (first, entries [W]): the split's table entries from index `first`, preloaded

    def preload(self, width: int, block_k: int, num_splits: int) -> None:
        """Load the ``width`` table entries from the first page of this program's split (the split of the
        contiguous kernel body, ``split_blocks``); the window slides back to stay inside the table, and still
        covers every block the split walks since ``width`` covers the longest split."""
        b, j = pl.program_id(0), pl.program_id(2)
        max_pages = self.tables.shape[1]
        n = jnp.clip(self.lengths[b], 0, max_pages * self.page_size)
        first = common.window_start(n, self.window) // block_k
        lo, _ = common.split_blocks(n, j, block_k, num_splits, first)
        first = jnp.minimum(lo * (block_k // self.page_size), max_pages - width)
        self._entries = (first, self.tables[b, pl.ds(first, width)])

    def __call__(self, b, window, width, col0: int = 0):
        last = self._last
        if last is None or not (last[0] is b and last[1] is window.start and last[2] == window.size):
            self._last = last = (b, window.start, window.size, self._pages(b, window), {})
        if (width, col0) not in last[4]:  # else the same traced values: a later read of the block just read
            last[4][width, col0] = self._offsets(b, window, width, col0)
        return (last[3], *last[4][width, col0])

    def _pages(self, b, window):
        ps, size = self.page_size, window.size
        if self._entries is not None:
            first, entries = self._entries
            width = entries.shape[0]
            want = window.start // ps - first + lax.broadcasted_iota(jnp.int32, (size, 1), 0) // ps  # [bk, 1]
            hit = want == lax.broadcasted_iota(jnp.int32, (1, width), 1)
            pages = jnp.sum(jnp.where(hit, entries[None, :], 0), axis=1, keepdims=True)
            return jnp.clip(pages, 0, self.num_pages - 1)
        r = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
        pages = self.tables[b, (window.start + r) // ps]  # [bk, 1]
        return jnp.clip(pages, 0, self.num_pages - 1)  # an entry without a page only covers masked rows

    def _offsets(self, b, window, width, col0: int = 0):
        ps, size, n = self.page_size, window.size, self.lengths[b]
        r = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
        rows = r % ps
        cols = lax.broadcasted_iota(jnp.int32, (1, width), 1)
        offsets = (rows, cols + col0 if col0 else cols)
        pos = window.start + lax.broadcasted_iota(jnp.int32, (size, width), 0)
        valid = pos < n
        if self.window is not None:  # rows before the window (a ring's released pages) are not read either
            valid = valid & (pos >= common.window_start(n, self.window))
        return offsets, valid


def pad_tables(tables, pages_per_block: int):
    """A block may run past the table's last column (masked): pad the table so its index load stays in bounds."""
    max_pages = tables.shape[1]
    if max_pages % pages_per_block:
        tables = jnp.pad(tables, ((0, 0), (0, -max_pages % pages_per_block)), constant_values=-1)
    return tables


# ----------------------------------------------------------------------------------------------- kernel


def _paged_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B, Mp] int32: Mp = M padded to a multiple of pages_per_block
    q_ref,  # [B, N, D]
    k_ref,  # [L, P, K, page_size, D]: the whole pool; each program reads the pages its sequence's table names
    v_ref,  # [L, P, K, page_size, D]
    # outputs: as in pallas_kernels.decode
    *refs,
    preload: int,
    **params,
):
    addresses = BlockAddresses(tables_ref, lengths_ref, k_ref.shape[1], k_ref.shape[3], params["window"])
    if preload:
        addresses.preload(preload, params["block_k"], params["num_splits"])
    decode.decode_kernel(
        lengths_ref, layer_ref, q_ref, PagedView(k_ref, addresses), PagedView(v_ref, addresses), *refs, **params
    )


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "interpret"))
def _paged(
    q, k_pages, v_pages, tables, lengths, layer, *, scale, config: PagedConfig, interpret, window=None, softcap=None
):
    # q [B, N, D]; k_pages, v_pages [L, P, K, page_size, D]; tables int32[B, M]; lengths int32[B]; layer int32[1]
    kv_heads, page_size, _ = k_pages.shape[2:]
    batch, max_pages = tables.shape
    group = q.shape[1] // kv_heads
    splits, ppb = config.num_splits, config.pages_per_block
    tables = pad_tables(tables, ppb)
    fused = common.fuses_merge(config)
    out_shape = common.split_out_shape(q, splits, fused, kv_heads)
    inputs = [lengths, layer, tables, q, k_pages, v_pages]
    preload = preload_entries(max_pages, ppb, splits, page_size) if config.preload else 0
    options = decode.kernel_options(k_pages.dtype, group, ppb * page_size, splits, scale, window, softcap)
    kernel = functools.partial(_paged_kernel, preload=preload, fused_merge=fused, interpret=interpret, **options)
    grid = (batch, kv_heads, splits)
    return common.launch_split_kernel(
        kernel, inputs, out_shape, {}, grid, config, interpret, "jkv_paged_attention", q.dtype
    )


# ----------------------------------------------------------------------------------------------- public


def check_args(
    q, k_pages, v_pages, block_tables, lengths, layer=None, window=None, *, chunked: bool = False
) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments of :func:`paged_decode_attention` (and its reference's); return
    ``(B, N, K, P, page_size, D)``. Concrete lengths, tables and layer are range-checked (table entries before
    the ``window``'s first page need not name a page: a ring releases them); traced ones cannot be (the kernel
    clamps them). ``chunked``: the kernel reads the columns in chunks (``checks.takes_head_dim``)."""
    (b, n, d), (num_pages, kh, page_size, _) = checks.check_kv(
        q, k_pages, v_pages, layer, q_axes="[B, N, D]", axes="[P, K, page_size, D]",
        layer_needs="needs pools of shape [L, P, K, page_size, D]", names=("k_pages", "v_pages"),
    )  # fmt: skip
    checks.check_head_dim(d, chunked)
    if page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two (a block of keys is whole pages)")
    checks.check_block_tables(block_tables, b, num_pages, page_size)  # its shape: M is read next
    max_len = block_tables.shape[1] * page_size
    checks.check_lengths(lengths, b, max_len, f"M * page_size = {max_len}")
    value = checks.concrete(lengths)
    if value is not None:  # the query at n - 1 reads from its window's start to n - 1
        first = np.zeros_like(value) if window is None else np.maximum(value - window, 0)
        why = lambda b0: f"lengths[{b0}]={int(value[b0])} covers it"
        checks.check_block_tables(block_tables, b, num_pages, page_size, first, value, why)
    return b, n, kh, num_pages, page_size, d


def paged_decode_attention(
    q: Float[Array, "B N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    preload: bool | None = None,
    fused_merge: bool | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` positions, through the table.

    ``layer`` selects the layer of ``[L, P, K, page_size, D]`` pools inside the kernel (no copy of a layer).
    ``scale`` defaults to ``D ** -0.5``. ``window`` and ``softcap`` as ``pallas_kernels.decode.decode_attention``
    (with a window, table entries before its first page are never read: a ring's released pages may be ``-1``).
    ``interpret=None`` runs interpret mode off GPU. ``pages_per_block``,
    ``num_splits``, ``num_warps``, ``num_stages``, ``preload`` (read a split's table entries before its
    loop, where they fit: :func:`preload_entries`) and ``fused_merge`` (the last split to finish merges, as
    ``decode.decode_attention``'s) override :func:`paged_config`.
    """
    checks.check_window_softcap(window, softcap)
    b, _, kh, _, page_size, d = check_args(q, k_pages, v_pages, block_tables, lengths, layer, window, chunked=True)
    default = paged_config(b, kh, reach_pages(block_tables, page_size, window), page_size, d, k_pages.dtype)
    overrides = dict(pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                     num_stages=num_stages, preload=preload, fused_merge=fused_merge)  # fmt: skip
    settings = dict(scale=scale, window=window, softcap=softcap, interpret=interpret)
    itemsize = jnp.dtype(k_pages.dtype).itemsize
    return launch(
        _paged, q, (k_pages, v_pages), block_tables, lengths, layer, default, itemsize, **settings, **overrides
    )


def reach_pages(block_tables, page_size: int, window) -> int:
    """Most table entries one query reads: the table's width, or the window's pages where it is narrower."""
    return -(-common.reach(block_tables.shape[1] * page_size, window) // page_size)


def launch(fn, q, pools, block_tables, lengths, layer, default, itemsize, *, scale, window, softcap, interpret,
           **overrides):  # fmt: skip
    """The launch plumbing of a checked paged decode call (Plain or Q8 pools): interpret mode, softmax scale, the
    config (``default`` with the launch ``overrides``, :func:`resolve_config`), whole pools and int32 arrays; then
    ``fn(q, *pools, tables, lengths, layer, **static arguments)``."""
    interpret = backend.resolve_interpret(interpret)
    page_size, head_dim = pools[0].shape[-2:]
    scale = checks.softmax_scale(scale, head_dim)
    config = resolve_config(default, page_size, head_dim, itemsize, **overrides)
    pools, layer = common.whole_cache(pools, layer)
    tables = jnp.asarray(block_tables).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    options = dict(scale=float(scale), window=window, softcap=softcap, config=config, interpret=interpret)
    return fn(q, *pools, tables, lengths, layer, **options)
