"""The Mosaic GPU multi-token attention kernel body (Hopper: TMA ring + warpgroup MMAs), shared by the contiguous
(``pallas_kernels.multi_token_mgpu``) and paged (``pallas_kernels.multi_token_mgpu_paged``) entry points through
its static ``pages_per_seq`` option, and the steps of its flash loop that the warp-specialised variant
(``pallas_kernels.multi_token_mgpu_ws``) shares: the K/V block fetch, the scores' soft cap, masks and online
softmax, the zeroing of V rows outside a tile's keys, and the output store. The layout of tiles and the loop are
described in ``multi_token_mgpu``'s module doc."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common
from pallas_kernels.common import LOG2E
from pallas_kernels.mgpu_common import ROWS, initial_carry, ring_accumulate, ring_scores, swizzled
from pallas_kernels.multi_token_tiles import ALIGN, NCOL


def kernel(
    # inputs
    table_ref,  # [tiles * NCOL] int32: multi_token_tiles.tile_table, flattened
    layer_ref,  # [1] int32
    pages_ref,  # [B * M] int32: the block table, flattened (paged; else unused)
    q_ref,  # [T, N, D] in the cache dtype (T a multiple of 8)
    k_ref,  # [L, B, K, S, D] (S a multiple of 8, >= block_k); paged: [L, P, K, page_size, D]
    v_ref,  # like k_ref
    # outputs
    o_ref,  # [T, N, D] in q's dtype; only the rows of live tiles are written
    *,
    config,  # multi_token_mgpu.MgpuMultiTokenConfig
    group: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    pages_per_seq: int | None,  # M: the block table's columns (None: a contiguous cache)
):
    plgpu = backend.mosaic_gpu_module()
    block_q, heads, block_k, stages = config.block_q, config.heads_per_tile, config.block_k, config.num_stages
    num_layers, _, _, max_len, head_dim = k_ref.shape
    page_size = max_len
    if pages_per_seq is not None:
        max_len = pages_per_seq * page_size
    dtype = k_ref.dtype
    head_group, tile = lax.axis_index("heads"), lax.axis_index("tile")
    b, row0, skip, nrows, pos_base, lo, hi, t_lo, u_lo, u_hi, t_hi = (table_ref[tile * NCOL + c] for c in range(NCOL))
    row0 = pl.multiple_of(row0, ALIGN)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)  # validated on the host when concrete
    first_head = head_group * heads
    kv_head = lax.div(first_head, jnp.int32(group))
    steps = t_hi - t_lo
    copies = 1 if pages_per_seq is None else block_k // page_size  # TMA copies per K or V block

    window_start = functools.partial(block_start, block_k=block_k, max_len=max_len)
    paged = dict(pages_ref=pages_ref, pages_per_seq=pages_per_seq)
    fetch_at = functools.partial(fetch_block, layer=layer, b=b, kv_head=kv_head, block_k=block_k, **paged)

    def attend(q_smem, k_smem, v_smem, q_barriers, k_barriers, v_barriers):
        # q_smem [ROWS, D]; k_smem, v_smem [stages, bk, D]; one barrier per query head and per slot and operand
        def fetch(ref, smem, barriers, i, slot):  # K or V of the loop's block i into a ring slot
            fetch_at(ref, smem, barriers, window_start(t_lo + i), slot)

        fetch_k = functools.partial(fetch, k_ref, k_smem, k_barriers)
        fetch_v = functools.partial(fetch, v_ref, v_smem, v_barriers)

        # The query tile and the first K/V blocks are all in flight before the program waits for any.
        for g in range(heads):
            dst = q_smem.at[pl.ds(g * block_q, block_q)]
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row0, block_q), first_head + g], dst, q_barriers.at[g])
        for i in range(stages):

            @pl.when(i < steps)
            def _prefetch(i=i):
                fetch_k(i, i)
                fetch_v(i, i)

        for g in range(heads):
            plgpu.barrier_wait(q_barriers.at[g])

        def step(i, carry, masked: bool):
            t = t_lo + i
            slot = lax.rem(i, jnp.int32(stages))
            start = window_start(t)
            refill = lambda: i + stages < steps
            s = ring_scores(
                q_smem, k_smem, k_barriers, slot, block_k, refill=refill, fetch=lambda: fetch_k(i + stages, slot)
            )

            row_limits = (pos_base, block_q, window) if masked else None
            p, m_new, denom, acc = softmax_block(s, carry, row_limits, start=start, t=t, scale=scale, softcap=softcap)
            plgpu.barrier_wait(v_barriers.at[slot])
            if masked:
                zero_v_outside(v_smem, slot, start=start, t=t, lo=lo, hi=hi)
            acc = ring_accumulate(acc, p, v_smem, slot, refill=refill, fetch=lambda: fetch_v(i + stages, slot))
            return acc, m_new, denom

        carry = initial_carry(head_dim)
        masked = functools.partial(step, masked=True)
        carry = lax.fori_loop(0, u_lo - t_lo, masked, carry)  # the window's edge
        carry = lax.fori_loop(u_lo - t_lo, u_hi - t_lo, functools.partial(step, masked=False), carry)
        return lax.fori_loop(u_hi - t_lo, steps, masked, carry)  # the causal diagonal

    acc, _, denom = pl.run_scoped(
        attend,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.Barrier(num_barriers=heads),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
    )

    pl.run_scoped(
        lambda o_smem: store_rows(plgpu, acc, denom, o_smem, o_ref, row0, skip, nrows, first_head, config),
        plgpu.SMEM((ROWS, head_dim), o_ref.dtype),
    )


def store_rows(plgpu, acc, denom, o_smem, o_ref, row0, skip, nrows, first_head, config) -> None:
    """Normalise a tile's ``acc`` (no keys: zeros) into the untiled ``o_smem [ROWS, D]`` and copy rows
    ``skip .. skip + nrows - 1`` of each head's block to ``o_ref`` rows ``row0 + skip ..``, in pieces of the
    powers of two that sum to ``nrows`` (a TMA copy has a static size)."""
    block_q, heads = config.block_q, config.heads_per_tile
    inv = common.inverse_or_zero(denom)
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
    plgpu.commit_smem()
    size = block_q
    while size >= 1:
        first = skip + nrows - lax.rem(nrows, jnp.int32(2 * size))

        @pl.when(lax.rem(lax.div(nrows, jnp.int32(size)), jnp.int32(2)) == 1)
        def _piece(first=first, size=size):
            for g in range(heads):
                src = o_smem.at[pl.ds(g * block_q + first, size)]
                plgpu.copy_smem_to_gmem(src, o_ref.at[pl.ds(row0 + first, size), first_head + g])

        size //= 2
    plgpu.wait_smem_to_gmem(0)


def block_start(t, *, block_k: int, max_len: int):
    """First position loaded for block ``t``: the block itself, slid back to end inside ``max_len``."""
    return pl.multiple_of(jnp.minimum(t * block_k, max_len - block_k), ALIGN)


def fetch_block(
    ref, smem, barriers, start, slot, *, layer, b, kv_head, block_k: int, pages_ref=None, pages_per_seq=None
):
    """Start the TMA copies of ``block_k`` positions from ``start`` of K or V (``ref``: the whole cache
    ``[L, B, K, S, D]``, or with ``pages_per_seq`` the pools ``[L, P, K, page_size, D]`` read through the flattened
    block table ``pages_ref``, one copy per page) into ring slot ``slot`` of ``smem``, on ``barriers.at[slot]``."""
    plgpu = backend.mosaic_gpu_module()
    if pages_per_seq is None:
        src = ref.at[layer, b, kv_head, pl.ds(start, block_k)]
        plgpu.copy_gmem_to_smem(src, smem.at[slot], barriers.at[slot])
        return
    num_pages, page_size = ref.shape[1], ref.shape[3]
    first = b * pages_per_seq + lax.div(start, jnp.int32(page_size))
    for j in range(block_k // page_size):  # one copy per page, all arriving on the slot's barrier
        page = jnp.minimum(jnp.maximum(pages_ref[first + j], 0), num_pages - 1)  # < 0: masked positions
        dst = smem.at[slot, pl.ds(j * page_size, page_size)]
        plgpu.copy_gmem_to_smem(ref.at[layer, page, kv_head], dst, barriers.at[slot])


def softmax_block(s, carry, row_limits, *, start, t, scale: float, softcap: float | None):
    """The online softmax over one block's scores ``s [ROWS, bk]`` (float32, unscaled) given the carry ``(acc,
    m, denom)`` (m in base-2 units): returns ``(p, m_new, denom, acc)`` with ``acc`` rescaled, before ``p @ V``.
    ``row_limits``: ``(pos_base, block_q, window)`` where the block needs masks (row ``r`` is at position
    ``pos_base + r % block_q``; keys before ``t * block_k`` were counted by the block before, a slid one), None
    where every key of the block is valid for every row (then the running max is finite)."""
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32
    block_k = s.shape[1]
    if softcap is None:
        s = s * (scale * LOG2E)
    else:
        s = jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)
    if row_limits is not None:
        pos_base, block_q, window = row_limits
        shape = (ROWS, block_k)
        pos = start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_layout)
        row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma_layout)
        limit = pos_base + lax.rem(row, jnp.int32(block_q))  # each row's own position
        valid = (pos >= t * block_k) & (pos <= limit)
        if window is not None:
            valid = valid & (pos + window > limit)
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing valid yet: no NaN
    else:  # every key of the block is valid for every row of the tile: m_new is finite
        m_new = m_use = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_use)  # 0 while m = -inf
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    denom = denom * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    return p, m_new, denom, acc


def zero_v_outside(v_smem, slot, *, start, t, lo, hi) -> None:
    """Zero the V rows of ring slot ``slot`` (block ``t``, loaded from ``start``) outside the tile's key range
    ``max(lo, t * block_k) .. hi - 1``: they may be NaN, and a 0 weight times NaN is NaN."""
    plgpu = backend.mosaic_gpu_module()
    _, block_k, head_dim = v_smem.shape
    keep_lo = jnp.maximum(lo, t * block_k)

    @pl.when((start < keep_lo) | (start + block_k > hi))
    def _zero_outside():
        v_slot = v_smem.at[slot]
        v = v_slot[...]
        rows = start + plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0, layout=plgpu.Layout.WGMMA)
        v_slot[...] = jnp.where((rows >= keep_lo) & (rows < hi), v, 0)
        plgpu.commit_smem()  # visible to the MMA (async proxy)
