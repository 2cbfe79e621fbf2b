"""The Mosaic GPU multi-token attention kernel over a paged cache: the contiguous kernel
(``pallas_kernels.multi_token_mgpu``) with each K/V block of the ring filled by one TMA copy per page through the
block table.

Pools ``[L, P, K, page_size, D]`` (or one layer ``[P, K, page_size, D]``) and ``block_tables int32[B, M]``: position
``s`` of sequence ``b`` is row ``s % page_size`` of page ``block_tables[b, s // page_size]`` (an entry < 0: no
page; such positions are never readable). ``page_size`` a multiple of 8 that divides the kernel's ``block_k``; a
table narrower than one block is widened with -1 entries (a copy of the table only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels import checks, common
from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels.multi_token_tiles import ALIGN


def check_paged_args(q, k_pages, v_pages, block_tables, q_starts, lengths, counts, layer=None, **options):
    """Validate a paged call; return ``(T, N, K, page_size, D, M)``. The pools and table are checked here, the
    rest by ``multi_token_mgpu.check_mgpu_args`` on the logical ``[B, K, M * page_size, D]`` cache."""
    kshape, vshape = getattr(k_pages, "shape", None), getattr(v_pages, "shape", None)
    if kshape is None or len(kshape) not in (4, 5) or vshape != kshape:
        raise ValueError(
            f"k_pages and v_pages must both be [P, K, page_size, D] or [L, P, K, page_size, D] pools, "
            f"got {kshape} and {vshape}"
        )
    shape, dtype = getattr(block_tables, "shape", None), getattr(block_tables, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"block_tables must be int[B, M], got {dtype}{shape}")
    batch, pages_per_seq = shape
    num_pages, kv_heads, page_size, head_dim = kshape[-4:]
    if page_size % ALIGN:
        raise ValueError(f"page_size={page_size} must be a multiple of {ALIGN} (a TMA tile's rows)")
    logical = jax.ShapeDtypeStruct((*kshape[:-4], batch, kv_heads, pages_per_seq * page_size, head_dim), k_pages.dtype)
    t, n, _, _, d = mgpu.check_mgpu_args(q, logical, logical, q_starts, lengths, counts, layer, **options)
    table = checks.concrete(block_tables)
    if table is not None and table.max(initial=-1) >= num_pages:
        raise ValueError(f"block_tables hold page {table.max()} but the pools have P={num_pages} pages")
    return t, n, kv_heads, page_size, d, pages_per_seq


def multi_token_attention_mgpu_paged(
    q: Float[Array, "T N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: mgpu.MgpuMultiTokenConfig | None = None,
) -> Float[Array, "T N D"]:
    """:func:`pallas_kernels.multi_token_mgpu.multi_token_attention_mgpu` over page pools and a block table (same
    arguments otherwise, same results as over the cache the pages spell out)."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config)
    return paged_call(mgpu._attend, q, k_pages, v_pages, block_tables, q_starts, lengths, counts, **options)


def paged_call(
    attend,
    q,
    k_pages,
    v_pages,
    block_tables,
    q_starts,
    lengths,
    counts,
    *,
    layer,
    scale,
    window,
    softcap,
    config,
    consumers: int = 1,
):
    """A paged entry's checks, launch parameters (``consumers`` warpgroups sharing the ring) and operands, then
    ``attend(q, k_pages, v_pages, table, q_starts, lengths, counts, layer, **static options, pages_per_seq)``."""
    q_starts, lengths, counts = (jnp.asarray(x).astype(jnp.int32) for x in (q_starts, lengths, counts))
    _, n, kh, page_size, d, _ = check_paged_args(
        q, k_pages, v_pages, block_tables, q_starts, lengths, counts, layer, window=window, softcap=softcap
    )
    config = resolve_paged_config(config, n, kh, d, page_size, k_pages.dtype, q.dtype, consumers=consumers)
    mgpu.require_mosaic_gpu()
    k_pages, v_pages, flat, pages_per_seq, layer = paged_operands(k_pages, v_pages, block_tables, layer, config)
    options = mgpu.static_options(scale, d, window, softcap, config)
    return attend(q, k_pages, v_pages, flat, q_starts, lengths, counts, layer, **options, pages_per_seq=pages_per_seq)


def resolve_paged_config(config, num_heads, kv_heads, head_dim, page_size, dtype, out_dtype, consumers=1):
    """``multi_token_mgpu.resolve_config``, and pages that tile a ring slot."""
    config = mgpu.resolve_config(config, num_heads, kv_heads, head_dim, dtype, out_dtype, consumers=consumers)
    if config.block_k % page_size:
        raise ValueError(f"page_size={page_size} must divide config.block_k={config.block_k}")
    return config


def paged_operands(k_pages, v_pages, block_tables, layer, config):
    """The kernel's operands: whole ``[L, P, K, page_size, D]`` pools, the block table flattened to ``int32[B * M]``
    (widened with -1 entries where narrower than one block: a copy of the table only), its columns ``M`` and
    ``layer`` as ``int32[1]``."""
    (k_pages, v_pages), layer = common.whole_cache((k_pages, v_pages), layer)
    tables = jnp.asarray(block_tables, jnp.int32)
    narrow = config.block_k // k_pages.shape[3] - tables.shape[1]
    if narrow > 0:  # the ring's block spans more pages than a sequence has: no page for the rest
        tables = jnp.pad(tables, ((0, 0), (0, narrow)), constant_values=-1)
    return k_pages, v_pages, tables.reshape(-1), tables.shape[1], layer
