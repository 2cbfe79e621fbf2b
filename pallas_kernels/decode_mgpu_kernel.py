"""The Mosaic GPU decode kernel body (Hopper: TMA ring + warpgroup MMAs), shared by the contiguous
(``pallas_kernels.decode_mgpu``) and paged (``pallas_kernels.decode_mgpu_paged``) entry points, which differ only
in how a ring slot is filled (a :data:`SlotFill`) and in the static :class:`Ring` facts that follow from it.

* one program (one warpgroup, 128 threads) per ``(split, kv head, b)``; the ``G`` query heads of the kv head are
  ``G`` rows of a 64-row query tile (a warpgroup MMA has 64 rows), which the first MMA reads from shared memory.
  Tiled TMA copies start on the 8-row tile, so the tile is the 64-row window of ``q`` from the multiple of 8 at
  or below the head's first row (all of ``q``'s rows where it has fewer than 64); the other rows (other heads',
  or never written) are computed alongside and never stored: rows are independent through both MMAs and the
  softmax. (With the tile in registers as the MMA's operand, jax 0.11.2's Mosaic GPU gave wrong products at
  head_dim 64 for rows not starting the 8-row tile: docs/notes/decode_kernel.md, v7.);
* K and V blocks of ``block_k`` positions stream through a ring of ``num_stages`` shared-memory slots, each filled
  by ``Ring.copies`` TMA copies completing on the slot's barrier; a slot's K is refilled with the block
  ``num_stages`` ahead as soon as the block's scores are read, its V once the second MMA has completed, so up to
  ``num_stages`` blocks are in flight per program;
* ``s = q @ K^T`` and ``acc += p @ V`` are warpgroup MMAs (``wgmma``) into float32; the online softmax runs in
  base 2 on the MMA's register layout;
* split ``j`` walks its share of the ``cdiv(lengths[b], block_k)`` blocks (a length-driven loop: blocks past a
  length are never read). Where ``Ring.slides``, a block that would run past the capacity slides back to end at
  it (positions already counted are masked); in the block that ends past the length, the V rows past it are
  zeroed in shared memory before the MMA (a 0 weight times a NaN in an unused slot would still be NaN);
* one split: the kernel normalises and stores the ``G`` output rows; several: it stores ``acc`` and the rows'
  statistics (running max, softmax denominator) and ``pallas_kernels.common.merge_partials`` merges them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common
from pallas_kernels.common import LOG2E
from pallas_kernels.mgpu_common import ROWS, initial_carry, ring_accumulate, ring_scores, round_up, swizzled

STATS = 32  # float32 columns of a split's per-row statistics (max, denominator): 128-byte rows


class Program(NamedTuple):
    """A program's sequence, kv head and layer, and the sequence's length clamped to the capacity (traced int32
    scalars): what a :data:`SlotFill` reads."""

    b: jax.Array
    h: jax.Array
    layer: jax.Array
    n: jax.Array


# fill(program, ref, smem, barriers, t, slot): start the TMA copies of block t (positions t * block_k ..) of K or V
# (`ref`, the whole cache or pool in global memory) into ring slot `slot` of `smem`, arriving on barriers.at[slot].
SlotFill = Callable[..., None]


class Ring(NamedTuple):
    """Static facts of a slot fill (each distinct value compiles its own kernel)."""

    capacity: int  # positions a sequence can hold: lengths are clamped to it
    slides: bool  # a block past the capacity slides back to end at it (else blocks are always whole and in place)
    copies: int  # TMA copies per K or V slot, all arriving on the slot's barrier


def block_start(t, *, block_k: int, capacity: int):
    """First position of block ``t`` slid back to end inside ``capacity`` (a multiple of 8: the TMA tile)."""
    return pl.multiple_of(jnp.minimum(t * block_k, capacity - block_k), 8)


def kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [R, D]: the queries, one row per (b, query head), R = B * N rounded up to a multiple of 8
    k_ref,  # [L, X, K, Y, D]: the whole cache [L, B, K, S, D] or pool [L, P, K, page_size, D], read by `fill`
    v_ref,  # like k_ref
    # outputs: o [B, N, D] (one split); or acc [B, K, P, G, D] and stats [B, K, P, G, STATS] (float32; stats
    # column 0 the running max, column 1 the softmax denominator)
    *out_refs,
    fill: SlotFill,
    ring: Ring,
    group: int,
    block_k: int,
    num_splits: int,
    num_stages: int,
    scale: float,
):
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    j, h, b = lax.axis_index("split"), lax.axis_index("kv_head"), lax.axis_index("batch")
    num_layers, _, num_kv_heads, _, head_dim = k_ref.shape
    dtype = k_ref.dtype
    # Lengths, layer (and table entries) were validated on the host when concrete; clamps keep traced ones in bounds.
    n = jnp.minimum(jnp.maximum(lengths_ref[b], 0), ring.capacity)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)
    lo, hi = common.split_blocks(n, j, block_k, num_splits)  # the Triton kernel body's shares
    steps = jnp.maximum(hi - lo, 0)
    program = Program(b, h, layer, n)

    window_row, offset = query_window(b, h, num_kv_heads, group)

    def ring_loop(q_smem, k_smem, v_smem, q_barrier, k_barriers, v_barriers):
        # q_smem [ROWS, D]; k_smem, v_smem [stages, bk, D]; one barrier per ring slot and operand
        def fetch_k(t, slot):  # K of block t of the sequence into a ring slot
            fill(program, k_ref, k_smem, k_barriers, t, slot)

        def fetch_v(t, slot):
            fill(program, v_ref, v_smem, v_barriers, t, slot)

        def fetch(t, slot):
            fetch_k(t, slot)
            fetch_v(t, slot)

        # The query window and the first K/V blocks are all in flight before the program waits for any.
        fetch_query_window(plgpu, q_ref, q_smem, window_row, q_barrier.at[0])
        for i in range(num_stages):
            pl.when(i < steps)(functools.partial(fetch, lo + i, i))
        plgpu.barrier_wait(q_barrier.at[0])

        def step(i, carry):
            acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32 (m in base-2 units)
            t = lo + i
            slot = lax.rem(i, jnp.int32(num_stages))
            start = block_start(t, block_k=block_k, capacity=ring.capacity) if ring.slides else t * block_k

            refill = lambda: i + num_stages < steps
            s = ring_scores(
                q_smem, k_smem, k_barriers, slot, block_k, refill=refill, fetch=lambda: fetch_k(t + num_stages, slot)
            )

            pos = start + plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=wgmma_layout)
            # a slid block's positions before t * block_k were counted by the block before
            valid = ((pos >= t * block_k) & (pos < n)) if ring.slides else pos < n
            s = jnp.where(valid, s * (scale * LOG2E), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))  # finite: every block walked holds a valid position
            alpha = jnp.exp2(m - m_new)  # 0 on the first block (m = -inf)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            denom = denom * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            plgpu.barrier_wait(v_barriers.at[slot])

            @pl.when(start + block_k > n)  # the block ends past the length: zero V there (unused slots may be NaN)
            def _zero_tail():
                v_slot = v_smem.at[slot]
                v = v_slot[...]
                rows = plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0, layout=wgmma_layout)
                v_slot[...] = jnp.where(start + rows < n, v, 0)
                plgpu.commit_smem()  # visible to the MMA (async proxy)

            acc = ring_accumulate(acc, p, v_smem, slot, refill=refill, fetch=lambda: fetch_v(t + num_stages, slot))
            return acc, m_new, denom

        return lax.fori_loop(0, steps, step, initial_carry(head_dim))

    acc, m, denom = pl.run_scoped(
        ring_loop,
        plgpu.SMEM((ROWS, head_dim), q_ref.dtype, transforms=swizzled(q_ref.dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=swizzled(dtype)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=ring.copies, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=ring.copies, num_barriers=num_stages),
    )
    store_rows(acc, m, denom, out_refs, b=b, h=h, j=j, offset=offset, group=group, num_splits=num_splits)


def query_window(b, h, num_kv_heads: int, group: int):
    """``(window_row, offset)``: tiled TMA copies start at multiples of the 8-row tile, so kv head ``h``'s ``G``
    query rows sit at ``offset`` (0..7) in a window of up to 64 rows from the multiple of 8 at or below its first
    row. The other rows of the window belong to other heads (or lie past the end, where TMA fills zeros):
    computed, never stored."""
    first_row = b * (num_kv_heads * group) + h * group
    window_row = pl.multiple_of(lax.div(first_row, jnp.int32(8)) * 8, 8)
    return window_row, first_row - window_row


def fetch_query_window(plgpu, q_ref, q_smem, window_row, barrier) -> None:
    """Start the copy of the query window from ``window_row`` into ``q_smem`` on ``barrier``. Fewer than 64 query
    rows in all (small batches): the window is all of them, into the tile's first rows (the rest of the tile is
    never initialised: rows never stored)."""
    q_window = min(ROWS, q_ref.shape[0])
    q_dst = q_smem if q_window == ROWS else q_smem.at[pl.ds(0, q_window)]
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(window_row, q_window)], q_dst, barrier)


def store_rows(acc, m, denom, out_refs, *, b, h, j, offset, group: int, num_splits: int) -> None:
    """One split: normalise and store this kv head's rows of the tile to ``o``; several: store ``acc`` and the
    rows' statistics (natural-log max, denominator) for ``merge_partials``."""
    plgpu = backend.mosaic_gpu_module()
    head_dim = acc.shape[1]
    mine = pl.ds(offset, group)  # this kv head's rows of the tile

    if num_splits == 1:
        (o_ref,) = out_refs

        def store_o(o_smem):
            inv = common.inverse_or_zero(denom)  # length 0: zeros
            o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[mine], o_ref.at[b, pl.ds(h * group, group)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_o, plgpu.SMEM((ROWS, head_dim), o_ref.dtype))
        return

    acc_ref, stats_ref = out_refs

    def store_partials(acc_smem, stats_smem):
        acc_smem[...] = acc
        # One 128-byte row per query row (a bulk copy's shared-memory rows stay 128-byte aligned at any offset).
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, STATS), 1, layout=plgpu.Layout.WGMMA)
        m_nat = lax.broadcast_in_dim(m * (1.0 / LOG2E), (ROWS, STATS), [0])  # natural-log units
        stats_smem[...] = jnp.where(col == 0, m_nat, lax.broadcast_in_dim(denom, (ROWS, STATS), [0]))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem.at[mine], acc_ref.at[b, h, j])
        plgpu.copy_smem_to_gmem(stats_smem.at[mine], stats_ref.at[b, h, j])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store_partials, plgpu.SMEM((ROWS, head_dim), jnp.float32), plgpu.SMEM((ROWS, STATS), jnp.float32))


def launch(named_kernel, q, cache, lengths, layer, tables=None, *, batch: int, splits: int, mma_dtype=None):
    """Run ``named_kernel`` (the body bound to its options, under the name profiles show) on a grid
    ``(splits, K, B)`` and merge the splits' partials. ``q [B, N, D]``; ``cache``: the kernel's cache arrays in its
    order, each ``[L, B or P, K, ...]`` (K/V caches or pools; a quantized cache's codes and scales);
    ``lengths int32[B]``; ``layer int32[1]``; ``tables int32[B, M]`` (paged) is passed flattened after ``layer``;
    ``mma_dtype``: the query's MMA operand dtype (default the cache's)."""
    plgpu = backend.mosaic_gpu_module()
    kv_heads, head_dim = cache[0].shape[2], q.shape[-1]
    group = q.shape[1] // kv_heads
    if splits == 1:
        out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        rows = common.partial_rows(splits)  # the kernel writes the first `splits`
        out_type = (
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, STATS), jnp.float32),  # m, denom
        )
    q_rows = q.reshape(-1, head_dim).astype(mma_dtype or cache[0].dtype)  # [B * N, D]: a free reshape
    padded = round_up(q_rows.shape[0], 8)
    if padded != q_rows.shape[0]:  # whole 8-row tiles (a copy of q; only where B * N is not a multiple of 8)
        q_rows = jnp.pad(q_rows, ((0, padded - q_rows.shape[0]), (0, 0)))
    inputs = (lengths, layer, q_rows) if tables is None else (lengths, layer, tables.reshape(-1), q_rows)
    outs = plgpu.kernel(
        named_kernel,
        out_type=out_type,
        grid=(splits, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*inputs, *cache)
    if splits == 1:
        return outs
    acc, stats = outs
    flat = lambda x: x.reshape(batch * kv_heads, *x.shape[2:])  # free reshapes
    out = common.merge_partials(flat(acc), flat(stats), splits=splits, dtype=q.dtype, interpret=False)
    return out.reshape(q.shape)
