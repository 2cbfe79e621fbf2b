"""Single-query GQA decode attention over a paged KV cache, reading K/V through the block table (split-K).

Shapes: ``q [B, N, D]``; page pools ``k_pages``, ``v_pages`` either one layer ``[P, K, page_size, D]`` or all
layers ``[L, P, K, page_size, D]`` with a ``layer`` index (a Python int or a traced int32 scalar);
``block_tables int32[B, M]`` names the physical page of each logical page (``< 0``: none); ``lengths int[B]``
counts the valid leading positions of each sequence (0 gives a zero output). Position ``s`` of sequence ``b`` is
row ``s % page_size`` of page ``block_tables[b, s // page_size]``. Query head ``n`` reads kv head ``n // G``.

The kernel follows ``pallas_kernels.decode_attention`` (same grid, split-K and log-sum-exp combine, whose helpers
it reuses) and differs only in how it finds keys:

* the block table and lengths reach the kernel as int refs; each program loads the page indices of its current
  block (``pages_per_block`` consecutive table entries) and reads those pages straight from the pools, so no XLA
  gather ever assembles a sequence;
* a block is ``pages_per_block * page_size`` keys, gathered as ``[pages_per_block, page_size, D]`` (each page
  row a contiguous run of ``D`` values) and flattened for the dot;
* blocks wholly inside the sequence load unmasked; the one partial block at the end loads with a row mask, so
  table entries past the sequence's pages and rows past its length are never read (they may hold NaN).
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

from pallas_kernels import backend
from pallas_kernels import decode_attention as contiguous

MIN_BLOCK = contiguous.MIN_BLOCK  # Triton's smallest dot dimension


class PagedConfig(NamedTuple):
    """Launch parameters of the paged kernel (static: each distinct value compiles its own kernel)."""

    pages_per_block: int  # pages (consecutive table entries) per loop step
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_warps: int
    num_stages: int


def paged_config(
    batch: int, num_kv_heads: int, max_pages: int, page_size: int, head_dim: int, dtype, **kwargs
) -> PagedConfig:
    """Defaults: the contiguous kernel's block of keys, split and warps, counted in whole pages."""
    base = contiguous.decode_config(batch, num_kv_heads, max_pages * page_size, head_dim, dtype, **kwargs)
    ppb = max(1, base.block_k // page_size)
    block_k = ppb * page_size
    splits = contiguous.choose_num_splits(batch, num_kv_heads, max_pages * page_size, block_k, **kwargs)
    return PagedConfig(pages_per_block=ppb, num_splits=splits, num_warps=base.num_warps, num_stages=base.num_stages)


# ----------------------------------------------------------------------------------------------- kernel


def _paged_kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B, Mp] int32: Mp = M padded to a multiple of pages_per_block
    q_ref,  # [Gp, D]: this program's query tile
    k_ref,  # [L, P, K, page_size, D]: the whole pool; the program reads the pages its table names
    v_ref,  # [L, P, K, page_size, D]
    # then the aliased poison inputs (unused), then the outputs: o [Gp, D] (one split), or acc [Gp, D], m [Gp], l [Gp]
    *refs,
    pages_per_block: int,
    num_splits: int,
    scale: float,
    precision,
):
    plgpu = backend.triton_module()
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_layers, num_pages, _, page_size, head_dim = k_ref.shape
    max_len = tables_ref.shape[1] * page_size
    rows = q_ref.shape[0]
    block_k = pages_per_block * page_size
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.clip(lengths_ref[b], 0, max_len)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    num_blocks = pl.cdiv(n, block_k)
    per_split = pl.cdiv(num_blocks, num_splits)
    lo = j * per_split
    hi = jnp.minimum(lo + per_split, num_blocks)
    n_full = n // block_k  # blocks whose every position is valid

    q = q_ref[...].astype(k_ref.dtype)  # [Gp, D]

    page_rows = lax.broadcasted_iota(jnp.int32, (1, page_size, 1), 1)
    cols = lax.broadcasted_iota(jnp.int32, (1, 1, head_dim), 2)

    def load(ref, pages, valid):  # -> [bk, D]
        if valid is None:
            x = ref[layer, pages, h]  # [ppb, page_size, D], gathered through the table
        else:  # masked rows are not read at all; every index is an array so interpret mode can gather it too
            idx = (layer, pages[:, None, None], h, page_rows, cols)
            mask = valid.reshape(pages_per_block, page_size)[:, :, None]
            x = plgpu.load(ref.at[idx], mask=mask, other=0)
        return x.reshape(block_k, head_dim)

    def attend(carry, block, valid):
        m, l_sum, acc = carry  # [Gp], [Gp], [Gp, D] float32
        pages = tables_ref[b, pl.ds(block * pages_per_block, pages_per_block)]  # [ppb]
        pages = jnp.clip(pages, 0, num_pages - 1)  # entries without a page only occur in masked-out rows
        k = load(k_ref, pages, valid)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [Gp, bk] float32
        if valid is not None:
            s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
        p = jnp.exp(s - m_new[:, None])  # [Gp, bk]
        v = load(v_ref, pages, valid)  # masked rows are 0: 0 * NaN never reaches acc
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l_sum * alpha + jnp.sum(p, axis=1), acc

    def full_block(i, carry):
        return attend(carry, i, None)

    def tail_block(carry):
        pos = n_full * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return attend(carry, n_full, pos < n)

    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    carry = lax.fori_loop(lo, jnp.minimum(hi, n_full), full_block, carry)
    has_tail = (lo <= n_full) & (n_full < hi)
    m, l_sum, acc = lax.cond(has_tail, tail_block, lambda c: c, carry)

    if num_splits == 1:
        o_ref = refs[-1]
        inv = jnp.where(l_sum > 0, 1.0 / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)  # length 0: zeros
        o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = refs[-3:]
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l_sum


def _whole(shape):
    """A BlockSpec that hands the kernel the whole array, whatever the program."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret", "poison"))
def _paged(q, k_pages, v_pages, tables, lengths, layer, *, scale, config: PagedConfig, interpret: bool, poison: bool):
    # q [B, N, D]; k_pages, v_pages [L, P, K, page_size, D]; tables int32[B, M]; lengths int32[B]; layer int32[1]
    kv_heads, head_dim = k_pages.shape[2], k_pages.shape[4]
    batch, max_pages = tables.shape
    group = q.shape[1] // kv_heads
    rows = contiguous.group_rows(group)
    splits, ppb = config.num_splits, config.pages_per_block
    qg = q.reshape(batch, kv_heads, group, head_dim)  # (B, K, G, D)
    if rows != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # (B, K, Gp, D)
    # A block may run past the table's last column (masked): pad the table so its index load stays in bounds.
    tables = jnp.pad(tables, ((0, 0), (0, -max_pages % ppb)), constant_values=-1)

    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, rows, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),  # m
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),  # l
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, j: (b, h, j, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, j: (b, h, j, 0)),
        ]
    inputs = [lengths, layer, tables, qg, k_pages, v_pages]
    in_specs = [
        _whole(lengths.shape),
        _whole(layer.shape),
        _whole(tables.shape),
        pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j: (b, h, 0, 0)),
        _whole(k_pages.shape),
        _whole(v_pages.shape),
    ]
    aliases = {}
    if poison:  # NaN-filled buffers become the outputs: whatever the kernel fails to write stays NaN
        for i, (shape, spec) in enumerate(zip(out_shape, out_specs, strict=True)):
            aliases[len(inputs)] = i
            inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
            in_specs.append(spec)

    kernel = functools.partial(
        _paged_kernel,
        pages_per_block=ppb,
        num_splits=splits,
        scale=scale,
        precision=lax.Precision.HIGHEST if k_pages.dtype == jnp.float32 else None,
    )
    outs = backend.pallas_call(
        kernel,
        interpret=interpret,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        grid=(batch, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        name="jkv_paged_attention",
    )(*inputs)
    out = outs[0] if splits == 1 else contiguous.combine_splits(outs[1], outs[2], outs[0])  # (B, K, Gp, D)
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)


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


def _resolve_config(default: PagedConfig, page_size: int, **overrides) -> PagedConfig:
    for name, value in overrides.items():
        if value is not None and not _is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    ppb = overrides["pages_per_block"]
    if ppb is not None and (ppb < 1 or ppb & (ppb - 1) or ppb * page_size < MIN_BLOCK):
        raise ValueError(
            f"pages_per_block={ppb} must be a power of two with pages_per_block * {page_size=} >= {MIN_BLOCK}"
        )
    if overrides["num_splits"] is not None and overrides["num_splits"] < 1:
        raise ValueError(f"num_splits={overrides['num_splits']} must be >= 1")
    if overrides["num_warps"] is not None and overrides["num_warps"] not in contiguous.NUM_WARPS:
        raise ValueError(f"num_warps={overrides['num_warps']} must be one of {contiguous.NUM_WARPS}")
    if overrides["num_stages"] is not None and overrides["num_stages"] < 1:
        raise ValueError(f"num_stages={overrides['num_stages']} must be >= 1")
    chosen = (overrides[f] for f in PagedConfig._fields)
    return PagedConfig(*(d if o is None else int(o) for d, o in zip(default, chosen, strict=True)))


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
    poison: bool = False,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` positions, through the table.

    ``layer`` selects the layer of ``[L, P, K, page_size, D]`` pools inside the kernel (no copy of a layer).
    ``scale`` defaults to ``D ** -0.5``. ``interpret=None`` runs interpret mode off GPU. ``pages_per_block``,
    ``num_splits``, ``num_warps`` and ``num_stages`` override :func:`paged_config`. ``poison=True`` fills the
    kernel's output buffers with NaN before the launch (a test aid: elements it fails to write stay NaN).
    """
    b, _, kh, _, page_size, d = check_args(q, k_pages, v_pages, block_tables, lengths, layer)
    interpret = backend.resolve_interpret(interpret)
    if scale is None:
        scale = d**-0.5
    elif not isinstance(scale, (int, float, np.floating)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python number, got {scale!r}")
    config = _resolve_config(
        paged_config(b, kh, block_tables.shape[1], page_size, d, k_pages.dtype),
        page_size,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
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
