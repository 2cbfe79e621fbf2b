"""The Mosaic GPU Q8 / FP8 decode kernel body (Hopper: TMA ring of 8-bit codes and their scales, dequantization
in registers into 16-bit tiles, warpgroup MMAs), for ``pallas_kernels.decode_mgpu_q8``. Written for Q8 below; FP8
(e4m3 codes, one float32 scale per position) is the same with one scale per position (``R = 8``), and its codes
past the length (which may be NaN) are zeroed where their scale was.

The cache is read through free reshapes that make every TMA copy tile-sized: with ``C = D // 32`` scales per
position and ``R = 8 // C`` positions per 8-scale row, codes ``[L, B, K, S, D]`` are viewed as
``[L, B, K, S / R, R * D]`` and scales as ``[L, B, K, S / R, 8]`` (16- or 32-byte rows: TMA's narrowest). A ring
block is 64 view rows, ``64 * R`` positions: a ``[64, R * D]`` code window and a ``[64, 8]`` scale window per K
and V. Its sub-tile ``i < R`` (code columns ``i * D ..``, scale columns ``i * C ..``) holds the 64 positions
``block start + r * R + i``: each code row's scales sit in the same row of the scale window, so one 32-column
group is dequantized as the ``pallas_kernels.qmatmul_mgpu_formats`` Q8 weights are (the group's scale of each row
picked by a masked row sum and broadcast along the 8-bit MMA layout). Attention does not care in which order a
block's positions come, as long as K, V and the mask agree.

* one program (one warpgroup) per ``(split, kv head, b)``; the query window as in
  ``pallas_kernels.decode_mgpu_kernel`` (64 rows in shared memory, this kv head's ``G`` rows at ``offset``);
* per ring block: wait for its four windows; the scale windows go to registers with the scales of positions at
  or past the length zeroed (NaN may lie there; codes are finite, so those K and V values are exactly 0); per
  sub-tile, K codes are dequantized (float32, rounded to the MMA dtype) into one K tile, the scores ``q @ K^T``
  start as a warpgroup MMA, V codes are dequantized into one V tile while it runs, then ``acc += p @ V`` (both
  MMA operands in shared memory but ``p``), with the bf16 kernel's online softmax (base 2, positions at or past
  the length masked); the ring slot is refilled with the block ``num_stages`` ahead once its last sub-tile is
  dequantized;
* split-K and the store are ``decode_mgpu_kernel``'s (``common.split_blocks`` over ring blocks; one split
  normalises and stores, several store partials for ``merge_partials``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend, common
from pallas_kernels.common import LOG2E
from pallas_kernels.decode_mgpu_kernel import fetch_query_window, query_window, store_rows
from pallas_kernels.mgpu_common import ROWS, initial_carry, mma_accumulate

QBLOCK = 32  # values per scale: one 32-byte code tile column, one 64-byte 16-bit tile column


def interleave(scale_cols: int, scales_per_position: int) -> int:
    """``R``: positions per view row of ``scale_cols`` scales."""
    return scale_cols // scales_per_position


def tiles(dtype, cols: int):
    """Shared-memory transforms: 8 x ``cols`` tiles, swizzled over their row's bytes."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * jnp.dtype(dtype).itemsize)


def _row_picker(values):
    """``pick(j)``: column ``j`` (static) of ``values [ROWS, c]`` (MMA layout) as a row vector ``[ROWS]``."""
    plgpu = backend.mosaic_gpu_module()
    col = plgpu.broadcasted_iota(jnp.int32, values.shape, 1, layout=plgpu.Layout.WGMMA)
    return lambda j: jnp.where(col == j, values, jnp.zeros((), values.dtype)).sum(axis=1)


def _dequantize(codes, scale_row, tile, col: int, dst: int, dtype, floating: bool) -> None:
    """``codes[:, col : col + 32] * scale_row`` (float32) into ``tile[:, dst : dst + 32]`` as ``dtype``; with
    ``floating`` codes, rows of scale 0 (past the length) are 0 whatever the codes hold."""
    plgpu = backend.mosaic_gpu_module()
    q = plgpu.load(codes, (slice(None), pl.ds(col, QBLOCK)), layout=plgpu.Layout.WGMMA_8BIT).astype(jnp.float32)
    scale = plgpu.layout_cast(lax.broadcast_in_dim(scale_row, (ROWS, QBLOCK), [0]), plgpu.Layout.WGMMA_8BIT)
    value = q * scale
    if floating:
        value = jnp.where(scale == 0.0, 0.0, value)
    tile[:, pl.ds(dst, QBLOCK)] = value.astype(dtype)


def kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [R', D]: the queries, one row per (b, query head), in the MMA dtype; R' = B * N rounded up to 8
    k_ref,  # [L, B, K, S / R, R * D] int8: the whole cache's codes, viewed
    k_scale_ref,  # [L, B, K, S / R, 8] float16 or float32
    v_ref,  # like k_ref
    v_scale_ref,  # like k_scale_ref
    # outputs: as decode_mgpu_kernel.kernel's
    *out_refs,
    group: int,
    num_splits: int,
    num_stages: int,
    scale: float,
):
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    j, h, b = lax.axis_index("split"), lax.axis_index("kv_head"), lax.axis_index("batch")
    num_layers, _, num_kv_heads, view_rows, width = k_ref.shape
    head_dim = q_ref.shape[1]
    scale_cols = k_scale_ref.shape[-1]
    reps, chunks = width // head_dim, head_dim // QBLOCK  # R positions per view row, C 32-value groups
    per_scale = width // scale_cols  # values per scale: 32 (Q8) or D (FP8)
    floating = jnp.issubdtype(k_ref.dtype, jnp.floating)  # e4m3 codes may be NaN past the length (int8 cannot)
    span = ROWS * reps  # positions per ring block
    dtype = q_ref.dtype
    n = jnp.minimum(jnp.maximum(lengths_ref[b], 0), view_rows * reps)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)
    lo, hi = common.split_blocks(n, j, span, num_splits)
    steps = jnp.maximum(hi - lo, 0)

    window_row, offset = query_window(b, h, num_kv_heads, group)

    def ring_loop(q_smem, k_codes, v_codes, k_scales, v_scales, k_tile, v_tile, q_barrier, barriers):
        # q_smem [ROWS, D]; *_codes [stages, ROWS, R * D] int8; *_scales [stages, ROWS, 8]; *_tile [1, ROWS, D]
        def fetch(t, slot):  # ring block t's four windows, on one barrier
            rows = pl.ds(pl.multiple_of(t * ROWS, ROWS), ROWS)
            for src, dst in ((k_ref, k_codes), (k_scale_ref, k_scales), (v_ref, v_codes), (v_scale_ref, v_scales)):
                plgpu.copy_gmem_to_smem(src.at[layer, b, h, rows], dst.at[slot], barriers.at[slot])

        fetch_query_window(plgpu, q_ref, q_smem, window_row, q_barrier.at[0])
        for i in range(num_stages):
            pl.when(i < steps)(functools.partial(fetch, lo + i, i))
        plgpu.barrier_wait(q_barrier.at[0])

        def step(i, carry):
            t = lo + i
            slot = lax.rem(i, jnp.int32(num_stages))
            base = t * span
            plgpu.barrier_wait(barriers.at[slot])

            # Scale window row r, column c: position base + r * R + c // (scales per position). Zero at or past
            # the length.
            shape = (ROWS, scale_cols)
            rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=wgmma_layout)
            cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_layout)
            held = base + rows * reps + lax.div(cols, jnp.int32(scale_cols // reps)) < n

            def scales_of(ref):
                window = plgpu.load(ref.at[slot], (), layout=wgmma_layout, optimized=False).astype(jnp.float32)
                return _row_picker(jnp.where(held, window, 0.0))

            k_scale, v_scale = scales_of(k_scales), scales_of(v_scales)
            columns = plgpu.broadcasted_iota(jnp.int32, (ROWS, ROWS), 1, layout=wgmma_layout)
            for sub in range(reps):
                acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32 (m in base-2 units)
                plgpu.commit_smem()  # every warp past the last MMAs' reads of the tiles (each waits for its own)

                def dequantize(codes, scale_of, tile, sub=sub):
                    for g in range(chunks):
                        col = sub * head_dim + g * QBLOCK
                        _dequantize(codes.at[slot], scale_of(col // per_scale), tile.at[0], col, g * QBLOCK, dtype,
                                    floating)  # fmt: skip

                dequantize(k_codes, k_scale, k_tile)
                plgpu.commit_smem()  # the K tile visible to the MMA (async proxy)

                def qk(s_ref, sub=sub):  # V is dequantized while the first MMA runs (it reads q and K only)
                    plgpu.wgmma(s_ref, q_smem, k_tile.at[0].transpose((1, 0)))
                    dequantize(v_codes, v_scale, v_tile)
                    plgpu.commit_smem()  # the V tile visible to the second MMA; every warp past its code reads
                    if sub == reps - 1:
                        pl.when(i + num_stages < steps)(functools.partial(fetch, t + num_stages, slot))
                    return s_ref[...]  # waits for the MMA

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, ROWS), jnp.float32))  # column r: position base + r * R + sub
                valid = base + columns * reps + sub < n
                s = jnp.where(valid, s * (scale * LOG2E), -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))  # finite: sub-tile 0 of a walked block holds a valid position
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                denom = denom * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                acc = mma_accumulate(acc, p, v_tile, 0)  # complete on return: the tiles may be rewritten
                carry = acc, m_new, denom
            return carry

        return lax.fori_loop(0, steps, step, initial_carry(head_dim))

    code_width = reps * head_dim
    acc, m, denom = pl.run_scoped(
        ring_loop,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=tiles(dtype, QBLOCK)),
        plgpu.SMEM((num_stages, ROWS, code_width), k_ref.dtype, transforms=tiles(k_ref.dtype, QBLOCK)),
        plgpu.SMEM((num_stages, ROWS, code_width), v_ref.dtype, transforms=tiles(v_ref.dtype, QBLOCK)),
        plgpu.SMEM((num_stages, ROWS, scale_cols), k_scale_ref.dtype),
        plgpu.SMEM((num_stages, ROWS, scale_cols), v_scale_ref.dtype),
        plgpu.SMEM((1, ROWS, head_dim), dtype, transforms=tiles(dtype, QBLOCK)),
        plgpu.SMEM((1, ROWS, head_dim), dtype, transforms=tiles(dtype, QBLOCK)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=4, num_barriers=num_stages),
    )
    store_rows(acc, m, denom, out_refs, b=b, h=h, j=j, offset=offset, group=group, num_splits=num_splits)


def ring_bytes(head_dim: int, reps: int, scale_cols: int, scale_itemsize: int, dtype_itemsize: int, stages: int) -> int:
    """Shared memory of a program's buffers: the ring (codes and scales of K and V), two tiles and the queries."""
    ring = stages * 2 * ROWS * (reps * head_dim + scale_cols * scale_itemsize)
    return ring + 3 * ROWS * head_dim * dtype_itemsize
