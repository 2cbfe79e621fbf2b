"""The warp-specialised Mosaic GPU multi-token kernel over a paged cache: ``multi_token_mgpu_ws``'s two consumer
warpgroups and producer, the producer filling each ring slot page by page through the block table, so that the
table's reads and the copies' issue overlap the consumers' MMAs.

Same call and results as :func:`pallas_kernels.multi_token_mgpu_paged.multi_token_attention_mgpu_paged` (pools
``[L, P, K, page_size, D]`` or ``[P, K, page_size, D]``, ``block_tables int32[B, M]``, the same argument checks).
A ring slot of ``block_k`` positions from ``start`` is ``block_k / page_size`` TMA copies of whole pages, all
arriving on the slot's barrier (its arrival count set to their number). The producer reads the block's table
entries once for K and V, before it waits for the slot to be freed. A copy's logical page (table column) is
clamped into the pages of the tile's keys ``lo .. hi - 1`` (:func:`block_columns`): the kernel reads no table
entry of a position the tile does not attend (an entry < 0, stale or another sequence's page there is never
read); the rows such a clamped copy lands on lie outside the tile's keys, where scores are masked and V rows
zeroed as in the contiguous kernel. Entries read are clamped into the pool (a traced table is not range-checked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels import multi_token_mgpu_paged as paged
from pallas_kernels import multi_token_mgpu_ws as ws
from pallas_kernels.multi_token_tiles import tile_table


def block_columns(start, lo, hi, *, block_k: int, page_size: int) -> list:
    """The table columns of the ``block_k / page_size`` page copies that fill a ring slot with the positions from
    ``start`` (a multiple of ``page_size``), each clamped to the pages of keys ``lo .. hi - 1`` (``lo < hi``), so
    that every key of that range lands on its own row of the slot. Traced int32 scalars or Python ints."""
    ps = jnp.int32(page_size)
    first, lo_col, hi_col = (lax.div(jnp.asarray(x, jnp.int32), ps) for x in (start, lo, hi - 1))
    return [jnp.minimum(jnp.maximum(first + j, lo_col), hi_col) for j in range(block_k // page_size)]


def _page_copies(where: ws.Where, start, *, pages_ref, pages_per_seq: int, num_pages: int, page_size: int, block_k):
    """A ``multi_token_mgpu_ws.Locate`` through the flattened block table ``pages_ref [B * M]``: one copy per page."""
    copies = []
    for j, column in enumerate(block_columns(start, where.lo, where.hi, block_k=block_k, page_size=page_size)):
        entry = pages_ref[where.b * pages_per_seq + column]
        page = jnp.minimum(jnp.maximum(entry, 0), num_pages - 1)  # a traced table: inside the pool
        copies.append(((where.layer, page, where.kv_head), pl.ds(j * page_size, page_size)))
    return copies


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "pages_per_seq"))
def _attend(
    q, k_pages, v_pages, pages, q_starts, lengths, counts, layer, *, scale, window, softcap, config, pages_per_seq
):
    # q [T, N, D]; k_pages, v_pages [L, P, K, page_size, D]; pages int32[B * M]; q_starts, lengths, counts
    # int32[B]; layer int32[1]
    num_rows, num_heads, _ = q.shape
    _, num_pages, kv_heads, page_size, _ = k_pages.shape
    block_k = config.block_k
    table = tile_table(
        q_starts,
        lengths,
        counts,
        num_rows=num_rows,
        block_q=ws.CONSUMERS * config.block_q,
        block_k=block_k,
        window=window,
    )
    options = dict(scale=scale, window=window, softcap=softcap)
    body = functools.partial(ws._kernel, config=config, group=num_heads // kv_heads, **options)
    sizes = dict(pages_per_seq=pages_per_seq, num_pages=num_pages, page_size=page_size, block_k=block_k)

    def jkv_multi_token_attention_mgpu_ws_paged(table_ref, layer_ref, pages_ref, *refs):  # the name in profiles
        locate = functools.partial(_page_copies, pages_ref=pages_ref, **sizes)
        fill = ws.Fill(locate, capacity=pages_per_seq * page_size, copies=block_k // page_size)
        body(table_ref, layer_ref, *refs, fill=fill)

    threads = dict(num_threads=ws.CONSUMERS + 1, thread_name="wg")
    named = jkv_multi_token_attention_mgpu_ws_paged
    return mgpu.launch(named, table, layer, q, k_pages, v_pages, pages=pages, config=config, **threads)


def multi_token_attention_mgpu_ws_paged(
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
    """:func:`pallas_kernels.multi_token_mgpu_paged.multi_token_attention_mgpu_paged`, warp-specialised (see the
    module doc); ``config`` is checked for two consumers' query and output tiles beside the ring."""
    options = dict(layer=layer, scale=scale, window=window, softcap=softcap, config=config, consumers=ws.CONSUMERS)
    return paged.paged_call(_attend, q, k_pages, v_pages, block_tables, q_starts, lengths, counts, **options)
