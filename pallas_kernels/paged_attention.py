"""Single-query GQA decode attention over a paged KV cache, reading K/V through the block table (split-K).

Shapes: ``q [B, N, D]``; page pools ``k_pages``, ``v_pages`` either one layer ``[P, K, page_size, D]`` or all
layers ``[L, P, K, page_size, D]`` with a ``layer`` index (a Python int or a traced int32 scalar);
``block_tables int32[B, M]`` names the physical page of each logical page (``< 0``: none); ``lengths int[B]``
counts the valid leading positions of each sequence (0 gives a zero output). Position ``s`` of sequence ``b`` is
row ``s % page_size`` of page ``block_tables[b, s // page_size]``. Query head ``n`` reads kv head ``n // G``.

One kernel body for both caches: the paged kernel runs ``pallas_kernels.decode_attention``'s kernel body (grid
``(b, kv head, split)``, ragged lengths, GQA query tile, split-K with its in-kernel or XLA log-sum-exp merge,
launch heuristics) unchanged, over a :class:`PagedView` of the pools in place of the contiguous cache ref. The
view presents the logical ``[L, B, K, M * page_size, D]`` cache and turns each block read
``k[layer, b, h, start : start + block_k]`` into

* one load of ``block_k // page_size`` page indices from the block table, which reaches the kernel as an int ref
  (no XLA gather ever assembles a sequence), then
* one gathered load of those pages straight from the pool (each page row a contiguous run of ``D`` values),
  masked by row so that rows past the sequence's length, and pages past those its table covers, are never read
  (they may hold NaN or belong to another sequence).

A block is therefore whole pages: ``block_k = pages_per_block * page_size``.

Q8 pages (:func:`paged_q8_decode_attention`): int8 code pools ``[L, P, K, page_size, D]`` and scale pools
``[L, P, K, page_size, D // 32]``, read the same way by ``pallas_kernels.q8``'s kernel body (its fused dequant,
``fuse="wide"`` by default) over four views that share one block's page indices: the codes and the scales of a
block come from the same pages, so the table is read once per block.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int, Int8

from pallas_kernels import backend, q8
from pallas_kernels import decode_attention as contiguous

MIN_BLOCK = contiguous.MIN_BLOCK  # Triton's smallest dot dimension


class PagedConfig(NamedTuple):
    """Launch parameters of the paged kernel (static: each distinct value compiles its own kernel)."""

    pages_per_block: int  # pages (consecutive table entries) per loop step
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int
    fused_combine: bool = False  # merge the splits inside the kernel (see pallas_kernels.decode_attention)
    gather: str = "rows"  # how a block is addressed: one page index per row, or per page (see PagedView)
    preload: bool = False  # read the split's table entries once, before its loop (see preload_entries)
    merge: str = "xla"  # how several splits' partials are merged (pallas_kernels.decode_attention.SPLIT_MERGES)


PRELOAD_MAX = 64  # most table entries a program holds in registers when its split's entries are preloaded
# Preload only where a split walks at most this many positions. Measured on an H100 (docs/BENCHMARKS.md, "Paged
# attention"; pages of 16-64 positions): with 256 keys per split (1 x 4096: bf16, two 128-key blocks; Q8, four
# 64-key blocks) preloading took bf16 pages from 1.13-1.14x to 1.01-1.05x the contiguous kernel and Q8 pages
# from 13.0-13.2 to 11.4-11.7 us: such a split is one burst of loads, and a table read inside it is exposed
# latency. With 512+ keys per split (1 x 32768, 8 x 4096) the in-loop reads pipeline and preloading lost
# (bf16 57.2 -> 57.6-59.8 us; Q8 pages 45-46 -> 50 us with 1024 keys per split).
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
    base = contiguous.decode_config(batch, num_kv_heads, max_len, head_dim, dtype, **kwargs)
    ppb = max(1, base.block_k // page_size, MIN_BLOCK // page_size)
    block_k = ppb * page_size
    splits = contiguous.choose_num_splits(batch, num_kv_heads, max_len, block_k, **kwargs)
    stages = min(base.num_stages, contiguous.max_stages(block_k, head_dim, jnp.dtype(dtype).itemsize))
    preload = preload_entries(max_pages, ppb, splits, page_size) > 0
    return PagedConfig(ppb, splits, base.num_warps, stages, base.fused_combine, "rows", preload, base.merge)


# ----------------------------------------------------------------------------------------------- kernel


GATHERS = ("rows", "pages")


class PagedView:
    """Pools ``[L, P, K, page_size, D]`` seen as the contiguous ``[L, B, K, M * page_size, D]`` cache, inside a
    kernel: indexing with ``[layer, b, h, pl.ds(start, size), :]`` (``start`` and ``size`` multiples of
    ``page_size``) loads those positions through sequence ``b``'s block table.

    ``gather="rows"`` loads the block as a ``[size, D]`` tile whose row ``r`` reads table entry
    ``(start + r) // page_size`` (repeated entries hit the cache); ``gather="pages"`` loads the
    ``size // page_size`` entries once and the block as ``[pages, page_size, D]``, reshaped to ``[size, D]``.
    Either way every index is an array (one gather, which interpret mode can run too) and the load is masked by
    row: rows past the sequence's length are not read. The K and V views of one kernel (and the scale views of
    Q8 pages) share ``addresses``, so every read of a block after the first reuses the page indices it loaded.
    Only whole rows are read (the last index must be ``:``).

    Page indices come from the block table in global memory, a read each block's K/V loads wait for; with
    :meth:`_BlockAddresses.preload` they come from the split's entries loaded once before the loop (a one-hot
    select in registers), so no load inside the loop depends on another and the loop's loads pipeline as the
    contiguous kernel's do.
    """

    def __init__(self, pool_ref, addresses: _BlockAddresses):
        self.pool, self.addresses = pool_ref, addresses
        num_layers, _, kv_heads, page_size, head_dim = pool_ref.shape
        batch, max_pages = addresses.tables.shape
        self.shape = (num_layers, batch, kv_heads, max_pages * page_size, head_dim)
        self.dtype = pool_ref.dtype

    def __getitem__(self, index):
        layer, b, h, window, cols = index
        if cols != slice(None):
            raise NotImplementedError(f"a paged view reads whole rows ([..., :]), got columns {cols}")
        pages, offsets, valid = self.addresses(b, window, self.shape[4])
        x = backend.load(self.pool.at[(layer, pages, h, *offsets)], mask=valid, other=0)
        return x.reshape(window.size, self.shape[4])  # [bk, D]


class _BlockAddresses:
    """Page indices of one block, loaded once for all its reads, and its in-page offsets and row mask, built once
    per row width (``D`` for K/V values, ``D // 32`` for Q8 scales)."""

    def __init__(self, tables_ref, lengths_ref, num_pages: int, page_size: int, gather: str):
        self.tables, self.lengths = tables_ref, lengths_ref
        self.num_pages, self.page_size, self.gather = num_pages, page_size, gather
        self._last = None  # (b, start, size, pages, {width: (offsets, valid)}) of the block last asked for
        self._entries = None  # (first, entries [W]): the split's table entries from index `first`, preloaded

    def preload(self, width: int, block_k: int, num_splits: int) -> None:
        """Load the ``width`` table entries from the first page of this program's split (the split of the
        contiguous kernel body, ``split_blocks``); the window slides back to stay inside the table, and still
        covers every block the split walks since ``width`` covers the longest split."""
        b, j = pl.program_id(0), pl.program_id(2)
        max_pages = self.tables.shape[1]
        n = jnp.clip(self.lengths[b], 0, max_pages * self.page_size)
        lo, _ = contiguous.split_blocks(n, j, block_k, num_splits)
        first = jnp.minimum(lo * (block_k // self.page_size), max_pages - width)
        self._entries = (first, self.tables[b, pl.ds(first, width)])

    def __call__(self, b, window, width):
        last = self._last
        if last is None or not (last[0] is b and last[1] is window.start and last[2] == window.size):
            self._last = last = (b, window.start, window.size, self._pages(b, window), {})
        if width not in last[4]:  # else the same traced values: a later read of the block just read
            last[4][width] = self._offsets(b, window, width)
        return (last[3], *last[4][width])

    def _pages(self, b, window):
        ps, size = self.page_size, window.size
        if self._entries is not None:
            first, entries = self._entries
            width = entries.shape[0]
            if self.gather == "rows":
                want = window.start // ps - first + lax.broadcasted_iota(jnp.int32, (size, 1), 0) // ps  # [bk, 1]
            else:
                want = window.start // ps - first + lax.broadcasted_iota(jnp.int32, (size // ps, 1), 0)  # [ppb, 1]
            hit = want == lax.broadcasted_iota(jnp.int32, (1, width), 1)
            pages = jnp.sum(jnp.where(hit, entries[None, :], 0), axis=1, keepdims=True)
            if self.gather == "pages":
                pages = pages[:, :, None]  # [ppb, 1, 1]
            return jnp.clip(pages, 0, self.num_pages - 1)
        if self.gather == "rows":
            r = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
            pages = self.tables[b, (window.start + r) // ps]  # [bk, 1]
        else:
            pages = self.tables[b, pl.ds(window.start // ps, size // ps)][:, None, None]  # [ppb, 1, 1]
        return jnp.clip(pages, 0, self.num_pages - 1)  # an entry without a page only covers masked rows

    def _offsets(self, b, window, width):
        ps, size, n = self.page_size, window.size, self.lengths[b]
        if self.gather == "rows":
            r = lax.broadcasted_iota(jnp.int32, (size, 1), 0)
            offsets = (r % ps, lax.broadcasted_iota(jnp.int32, (1, width), 1))
            valid = window.start + lax.broadcasted_iota(jnp.int32, (size, width), 0) < n
        else:
            ppb = size // ps
            offsets = tuple(lax.broadcasted_iota(jnp.int32, s, i) for s, i in (((1, ps, 1), 1), ((1, 1, width), 2)))
            pos = lax.broadcasted_iota(jnp.int32, (ppb, ps, width), 0) * ps
            valid = window.start + pos + lax.broadcasted_iota(jnp.int32, (ppb, ps, width), 1) < n
        return offsets, valid


def _paged_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B, Mp] int32: Mp = M padded to a multiple of pages_per_block
    q_ref,  # [B, N, D]
    k_ref,  # [L, P, K, page_size, D]: the whole pool; each program reads the pages its sequence's table names
    v_ref,  # [L, P, K, page_size, D]
    # aliased inputs, then outputs: as in pallas_kernels.decode_attention
    *refs,
    gather: str,
    preload: int,
    **params,
):
    addresses = _BlockAddresses(tables_ref, lengths_ref, k_ref.shape[1], k_ref.shape[3], gather)
    if preload:
        addresses.preload(preload, params["block_k"], params["num_splits"])
    contiguous._decode_kernel(
        lengths_ref, layer_ref, q_ref, PagedView(k_ref, addresses), PagedView(v_ref, addresses), *refs, **params
    )


def _whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "poison"))
def _paged(q, k_pages, v_pages, tables, lengths, layer, *, scale, config: PagedConfig, interpret: bool, poison: bool):
    # q [B, N, D]; k_pages, v_pages [L, P, K, page_size, D]; tables int32[B, M]; lengths int32[B]; layer int32[1]
    kv_heads, page_size, _ = k_pages.shape[2:]
    batch, max_pages = tables.shape
    num_heads = q.shape[1]
    group = num_heads // kv_heads
    splits, ppb = config.num_splits, config.pages_per_block
    # A block may run past the table's last column (masked): pad the table so its index load stays in bounds.
    if max_pages % ppb:
        tables = jnp.pad(tables, ((0, 0), (0, -max_pages % ppb)), constant_values=-1)

    # Outputs, aliases and their order as pallas_kernels.decode_attention's kernel body expects them.
    out_shape = contiguous.split_out_shape(q, splits, config.merge)
    fused = splits > 1 and config.fused_combine
    if fused:
        out_shape += [
            jax.ShapeDtypeStruct((batch * kv_heads,), jnp.int32),  # splits finished per (b, kv head)
            jax.ShapeDtypeStruct(q.shape, q.dtype),  # o
        ]
    inputs, aliases = [lengths, layer, tables, q, k_pages, v_pages], {}
    for i, o in enumerate(out_shape):
        if o.dtype == jnp.int32:  # the counters start at zero
            aliases[len(inputs)] = i
            inputs.append(jnp.zeros(o.shape, o.dtype))
        elif poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
            aliases[len(inputs)] = i
            inputs.append(jnp.full(o.shape, jnp.nan, o.dtype))
    kernel = functools.partial(
        _paged_kernel,
        gather=config.gather,
        preload=preload_entries(max_pages, ppb, splits, page_size) if config.preload else 0,
        num_aliased=len(aliases),
        group=group,
        rows=contiguous.group_rows(group),
        block_k=ppb * page_size,
        num_splits=splits,
        fused_combine=fused,
        scale=scale,
        precision=lax.Precision.HIGHEST if k_pages.dtype == jnp.float32 else None,
        interpret=interpret,
    )
    grid = (batch, kv_heads, splits)
    combine = splits > 1 and not fused
    return contiguous.launch_split_kernel(
        kernel, inputs, out_shape, aliases, grid, config, interpret, "jkv_paged_attention", combine, q.dtype
    )


# ----------------------------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _concrete(x):
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_args(q, k_pages, v_pages, block_tables, lengths, layer=None) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments of :func:`paged_decode_attention`; return ``(B, N, K, P, page_size, D)``.

    Concrete lengths, tables and layer are range-checked; traced ones cannot be (the kernel clamps them).
    """
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must have shape [B, N, D], got {getattr(q, 'shape', None)}")
    kshape, vshape = getattr(k_pages, "shape", None), getattr(v_pages, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(
            f"k_pages and v_pages must both have shape [P, K, page_size, D] or [L, P, K, page_size, D], "
            f"got {kshape} and {vshape}"
        )
    if len(kshape) == 5 and layer is None:
        raise ValueError(f"k_pages.shape={kshape} holds every layer [L, P, K, page_size, D]: pass layer=")
    if len(kshape) == 4 and layer is not None:
        raise ValueError(f"layer={layer!r} needs pools of shape [L, P, K, page_size, D], got k_pages.shape={kshape}")
    if k_pages.dtype != v_pages.dtype or jnp.dtype(k_pages.dtype) not in contiguous.CACHE_DTYPES:
        raise TypeError(
            f"k_pages and v_pages must share a dtype among {[str(d) for d in contiguous.CACHE_DTYPES]}, "
            f"got {k_pages.dtype}, {v_pages.dtype}"
        )
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be a floating array, got dtype {q.dtype}")
    b, n, d = q.shape
    num_pages, kh, page_size, dk = kshape[-4:]
    if dk != d:
        raise ValueError(f"q.shape={q.shape} does not match k_pages.shape={kshape} (head_dim must agree)")
    if n % kh:
        raise ValueError(f"num_q_heads={n} must be a multiple of num_kv_heads={kh}")
    if d not in contiguous.HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported; expected one of {contiguous.HEAD_DIMS}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size={page_size} must be a power of two (a block of keys is whole pages)")
    tshape = getattr(block_tables, "shape", None)
    if tshape is None or len(tshape) != 2 or tshape[0] != b or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be int[{b}, M], got {getattr(block_tables, 'dtype', None)}{tshape}")
    if getattr(lengths, "shape", None) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be int[{b}], got {getattr(lengths, 'dtype', None)}{getattr(lengths, 'shape', None)}"
        )
    max_len = tshape[1] * page_size
    value = _concrete(lengths)
    if value is not None and (value.min(initial=0) < 0 or value.max(initial=0) > max_len):
        raise ValueError(f"lengths={value} must lie in [0, M * page_size = {max_len}]")
    tables = _concrete(block_tables)
    if value is not None and tables is not None:
        used = np.arange(tshape[1])[None, :] < -(-value[:, None] // page_size)  # entries the lengths cover
        bad = used & ((tables < 0) | (tables >= num_pages))
        if bad.any():
            b0, m0 = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"block_tables[{b0}, {m0}]={int(tables[b0, m0])} must name a page in [0, {num_pages}): "
                f"lengths[{b0}]={int(value[b0])} covers it"
            )
    if layer is not None:
        if isinstance(layer, (bool, float)) or not (
            _is_int(layer) or (hasattr(layer, "dtype") and jnp.issubdtype(layer.dtype, jnp.integer))
        ):
            raise TypeError(f"layer must be an int or an integer scalar, got {layer!r}")
        if getattr(layer, "shape", ()) != ():
            raise ValueError(f"layer must be a scalar, got shape {layer.shape}")
        lv = _concrete(layer)
        if lv is not None and not 0 <= int(lv) < kshape[0]:
            raise ValueError(f"layer={int(lv)} out of range for num_layers={kshape[0]}")
    return b, n, kh, num_pages, page_size, d


def _resolve_config(default: PagedConfig, page_size: int, head_dim: int, itemsize: int, **overrides) -> PagedConfig:
    """The default with the caller's overrides (``None`` keeps the default), validated; stages are capped so the
    resident K/V blocks fit in shared memory (``pallas_kernels.decode_attention.max_stages``)."""
    gather = overrides.pop("gather", None)
    preload = overrides.pop("preload", None)
    if preload is not None and not isinstance(preload, (bool, np.bool_)):
        raise TypeError(f"preload must be a bool, got {preload!r}")
    if gather is not None and gather not in GATHERS:
        raise ValueError(f"gather={gather!r} must be one of {GATHERS}")
    contiguous.check_launch_overrides(**overrides)
    fused = overrides.pop("fused_combine", None)
    ppb = overrides["pages_per_block"]
    if ppb is not None and (ppb < 1 or ppb & (ppb - 1) or ppb * page_size < MIN_BLOCK):
        raise ValueError(
            f"pages_per_block={ppb} must be a power of two with pages_per_block * {page_size=} >= {MIN_BLOCK}"
        )
    chosen = [overrides[f] for f in PagedConfig._fields[:4]] + [fused, gather, preload, None]
    config = PagedConfig(*(d if o is None else type(d)(o) for d, o in zip(default, chosen, strict=True)))
    cap = contiguous.max_stages(config.pages_per_block * page_size, head_dim, itemsize)
    return config._replace(num_stages=min(config.num_stages, cap))


# ----------------------------------------------------------------------------------------------- public


def paged_decode_attention(
    q: Float[Array, "B N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused_combine: bool | None = None,
    gather: str | None = None,
    preload: bool | None = None,
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` positions, through the table.

    ``layer`` selects the layer of ``[L, P, K, page_size, D]`` pools inside the kernel (no copy of a layer).
    ``scale`` defaults to ``D ** -0.5``. ``interpret=None`` runs interpret mode off GPU. ``pages_per_block``,
    ``num_splits``, ``num_warps``, ``num_stages``, ``fused_combine``, ``gather`` and ``preload`` (read a split's
    table entries before its loop, where they fit: :func:`preload_entries`) override :func:`paged_config`.
    ``poison=True`` fills the kernel's output buffers with NaN before the launch (a test aid: elements it fails
    to write stay NaN).
    """
    b, _, kh, _, page_size, d = check_args(q, k_pages, v_pages, block_tables, lengths, layer)
    interpret = backend.resolve_interpret(interpret)
    scale = contiguous.softmax_scale(scale, d)
    config = _resolve_config(
        paged_config(b, kh, block_tables.shape[1], page_size, d, k_pages.dtype),
        page_size,
        d,
        jnp.dtype(k_pages.dtype).itemsize,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        fused_combine=fused_combine,
        gather=gather,
        preload=preload,
    )
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0  # a free reshape, not a copy
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    tables = jnp.asarray(block_tables).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _paged(
        q, k_pages, v_pages, tables, lengths, layer, scale=float(scale), config=config, interpret=interpret,
        poison=poison,
    )  # fmt: skip


def gather_pages(pages: Array, block_tables: Array) -> Array:
    """``[P, K, page_size, D]`` pages in table order: contiguous ``[B, K, M * page_size, D]`` (entries < 0 read
    page 0, for the caller to mask)."""
    x = pages[jnp.clip(block_tables, 0, pages.shape[0] - 1)]  # (B, M, K, page_size, D)
    b, m, kh, ps, d = x.shape
    return x.swapaxes(1, 2).reshape(b, kh, m * ps, d)


def paged_decode_attention_reference(
    q: Float[Array, "B N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    **launch,
) -> Float[Array, "B N D"]:
    """Pure-``jnp`` reference with the kernel's signature: gather the pages into a contiguous cache (an XLA
    gather of every table entry) and run the contiguous reference. Launch arguments are accepted and ignored."""
    del launch
    check_args(q, k_pages, v_pages, block_tables, lengths, layer)
    if k_pages.ndim == 5:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    return contiguous.decode_attention_reference(q, k, v, lengths, scale=scale)


# ----------------------------------------------------------------------------------------------- Q8 pages

# pallas_kernels.q8's fusions but "scores", whose 32-wide column reads a paged view does not address.
Q8_FUSE = tuple(f for f in q8.FUSE if f != "scores")


def paged_q8_config(batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int) -> PagedConfig:
    """Defaults: the contiguous Q8 kernel's block of keys (``q8.decode_config``) rounded to whole pages, and its
    splits, warps and stages for that block."""
    max_len = max_pages * page_size
    base = q8.decode_config(batch, num_kv_heads, max_len, head_dim)
    ppb = max(1, base.block_k // page_size, MIN_BLOCK // page_size)
    config = q8.decode_config(batch, num_kv_heads, max_len, head_dim, block_k=ppb * page_size)
    preload = preload_entries(max_pages, ppb, config.num_splits, page_size) > 0
    return PagedConfig(
        ppb, config.num_splits, config.num_warps, config.num_stages, False, "rows", preload, config.merge
    )


def _paged_q8_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B, Mp] int32: Mp = M padded to a multiple of pages_per_block
    q_ref,  # [B, N, D]
    k_ref,  # [L, P, K, page_size, D] int8: the whole pool
    k_scale_ref,  # [L, P, K, page_size, D // 32]
    v_ref,  # [L, P, K, page_size, D] int8
    v_scale_ref,  # [L, P, K, page_size, D // 32]
    # (poison inputs, aliased to the outputs and never read), then outputs: as in pallas_kernels.q8
    *refs,
    gather: str,
    preload: int,
    **params,
):
    addresses = _BlockAddresses(tables_ref, lengths_ref, k_ref.shape[1], k_ref.shape[3], gather)
    if preload:
        addresses.preload(preload, params["block_k"], params["num_splits"])
    views = [PagedView(ref, addresses) for ref in (k_ref, k_scale_ref, v_ref, v_scale_ref)]
    q8.decode_kernel(lengths_ref, layer_ref, q_ref, *views, *refs, scales_t=False, **params)


@functools.partial(jax.jit, static_argnames=("scale", "config", "fuse", "interpret", "poison"))
def _paged_q8(
    q, k, k_scale, v, v_scale, tables, lengths, layer, *, scale, config: PagedConfig, fuse, interpret, poison
):
    # q [B, N, D]; k, v int8[L, P, K, page_size, D]; scales [L, P, K, page_size, D // 32]; tables int32[B, M];
    # lengths int32[B]; layer int32[1]
    kv_heads, page_size, head_dim = k.shape[2:]
    max_pages = tables.shape[1]
    splits, ppb = config.num_splits, config.pages_per_block
    if max_pages % ppb:  # as in _paged: a block may run past the table's last column (masked)
        tables = jnp.pad(tables, ((0, 0), (0, -max_pages % ppb)), constant_values=-1)
    out_shape = contiguous.split_out_shape(q, splits, config.merge)
    inputs = [lengths, layer, tables, q, k, k_scale, v, v_scale]
    num_in = len(inputs)
    if poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
        inputs += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
    options = q8.kernel_options(q.dtype, q.shape[1] // kv_heads, head_dim, ppb * page_size, splits, scale, fuse)
    preload = preload_entries(max_pages, ppb, splits, page_size) if config.preload else 0
    kernel = functools.partial(
        _paged_q8_kernel, gather=config.gather, preload=preload, num_poison=len(inputs) - num_in, **options
    )
    aliases = {num_in + i: i for i in range(len(inputs) - num_in)}
    grid = (q.shape[0], kv_heads, splits)
    return contiguous.launch_split_kernel(
        kernel, inputs, out_shape, aliases, grid, config, interpret, "jkv_paged_q8_attention", splits > 1, q.dtype
    )


def check_q8_args(q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, layer=None):
    """Validate the arguments of :func:`paged_q8_decode_attention`; return ``(B, N, K, P, page_size, D)``."""
    q8.check_q8("k_pages", k_pages, k_scale_pages)
    q8.check_q8("v_pages", v_pages, v_scale_pages)
    if v_pages.shape != k_pages.shape or v_scale_pages.dtype != k_scale_pages.dtype:
        raise ValueError(
            f"k and v pages must have the same shape and scale dtype, got {k_pages.shape}/{k_scale_pages.dtype} "
            f"and {v_pages.shape}/{v_scale_pages.dtype}"
        )
    # Shapes, GQA, head_dim, page size, tables, lengths and layer as for bf16 pools, on stand-ins of the values.
    stand_in = jax.ShapeDtypeStruct(k_pages.shape, jnp.bfloat16)
    return check_args(q, stand_in, stand_in, block_tables, lengths, layer)


def paged_q8_decode_attention(
    q: Float[Array, "B N D"],
    k_pages: Int8[Array, "*L P K page D"],
    k_scale_pages: Float[Array, "*L P K page D//32"],
    v_pages: Int8[Array, "*L P K page D"],
    v_scale_pages: Float[Array, "*L P K page D//32"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    gather: str | None = None,
    preload: bool | None = None,
    fuse: str | None = None,
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention over Q8 pages: :func:`paged_decode_attention` with each of K and V given as code and
    scale pools, dequantized inside the loads as ``pallas_kernels.q8.decode_attention`` does. ``fuse`` picks
    where the scales enter (``Q8_FUSE``; default ``q8.DEFAULT_FUSE``); the launch arguments override
    :func:`paged_q8_config`. Products in ``q``'s dtype (bfloat16 / float16; tf32 on GPU for float32), softmax
    and accumulation in float32."""
    b, _, kh, _, page_size, d = check_q8_args(
        q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, layer
    )
    interpret = backend.resolve_interpret(interpret)
    scale = contiguous.softmax_scale(scale, d)
    fuse = q8.DEFAULT_FUSE if fuse is None else fuse
    if fuse not in Q8_FUSE:
        raise ValueError(f"fuse={fuse!r} is not one of {Q8_FUSE}")
    config = _resolve_config(
        paged_q8_config(b, kh, block_tables.shape[1], page_size, d),
        page_size,
        d,
        1,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        gather=gather,
        preload=preload,
    )
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    if k_pages.ndim == 4:
        pools, layer = tuple(x[None] for x in pools), 0  # free reshapes, not copies
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    tables = jnp.asarray(block_tables).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    options = dict(scale=float(scale), config=config, fuse=fuse, interpret=interpret, poison=poison)
    return _paged_q8(q, *pools, tables, lengths, layer, **options)


def paged_q8_decode_attention_reference(
    q: Float[Array, "B N D"],
    k_pages: Int8[Array, "*L P K page D"],
    k_scale_pages: Float[Array, "*L P K page D//32"],
    v_pages: Int8[Array, "*L P K page D"],
    v_scale_pages: Float[Array, "*L P K page D//32"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    **launch,
) -> Float[Array, "B N D"]:
    """Pure-``jnp`` reference with the kernel's signature: gather the pages (codes and scales), dequantize to
    float32 and run the contiguous reference. Launch arguments are accepted and ignored."""
    del launch
    check_q8_args(q, k_pages, k_scale_pages, v_pages, v_scale_pages, block_tables, lengths, layer)
    pools = (k_pages, k_scale_pages, v_pages, v_scale_pages)
    if k_pages.ndim == 5:
        pools = tuple(x[layer] for x in pools)
    k, k_scale, v, v_scale = (gather_pages(x, block_tables) for x in pools)
    k = q8.dequantize_reference(k, k_scale, dtype=jnp.float32)
    v = q8.dequantize_reference(v, v_scale, dtype=jnp.float32)
    return contiguous.decode_attention_reference(q, k, v, lengths, scale=scale)
