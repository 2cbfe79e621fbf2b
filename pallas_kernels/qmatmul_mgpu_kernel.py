"""The Mosaic GPU quantized matmul's kernel body (Hopper: TMA ring + dequantization in registers + warpgroup MMA),
for ``pallas_kernels.qmatmul_mgpu``. The product is computed transposed, ``W_tile @ x_tile^T``, so the weights'
``BLOCK_N`` rows are the MMA's 64 rows and the activations' few rows its narrow N (8-64): a decode step wastes no
MMA rows on padding.

* one program (one warpgroup) per ``(K split, row block of x, column block of BLOCK_N weight rows)``;
* each step's code window ``[BLOCK_N, BLOCK_K]`` (int8), its scale window ``[BLOCK_N, BLOCK_K / 32]`` (f16, one
  16-byte row per weight row) and the activations' window ``[block_m, BLOCK_K]`` come by TMA into a ring of
  ``num_stages`` shared-memory slots, the weights on one barrier per slot and the activations on another. Rows
  past ``N`` read as zeros (TMA) and their outputs are dropped by the store. Codes, activations and dequantized
  tiles are tiled by one 32-column group (8 x 32 tiles, swizzled over their 32/64-byte rows), so a group is one
  tile column: loaded, scaled and stored as a static ``[BLOCK_N, 32]`` slice, no reshape;
* the warpgroup dequantizes the slot group by group in registers (``code * scale`` in float32; the group's scale
  of each row taken out of the scale window by a masked row sum and broadcast along the row), rounds to the
  activations' dtype and stores into one of two ``[BLOCK_N, BLOCK_K]`` tiles; its codes and scales are then
  refilled with the step ``num_stages`` ahead. Both MMA operands are in shared memory (a register operand gave
  wrong rows in the decode kernel: docs/notes/decode_kernel.md, v7);
* the ``wgmma`` of step ``k`` runs while step ``k + 1`` is dequantized into the other tile; once it is known
  complete (``wgmma_wait(1)`` after the next one is issued), its activations' slot is refilled;
* the float32 accumulator ``[BLOCK_N, block_m]`` goes through shared memory to the partials ``[S, N, M']``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend

BLOCK_N = 64  # weight rows per program: a warpgroup MMA's rows
BLOCK_K = 256  # K per step: 8 Q8_0 groups, so a scale window row is 16 bytes (TMA's narrowest box row)
GROUP = 32  # Q8_0 values per scale


def group_tiles(dtype):
    """Shared-memory transforms tiling by one 32-column group: 8 x 32 tiles swizzled over their row's bytes."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, GROUP)), plgpu.SwizzleTransform(GROUP * jnp.dtype(dtype).itemsize)


def _dequantize(codes, scales, w_buf, dtype) -> None:
    """``codes [BLOCK_N, BLOCK_K]`` int8 times ``scales [BLOCK_N, BLOCK_K / 32]`` f16 (per 32 columns) in float32,
    rounded to ``dtype`` into ``w_buf [BLOCK_N, BLOCK_K]`` (shared-memory refs tiled by 32 columns: a group is
    one tile column, so each is loaded, scaled and stored as a static [BLOCK_N, 32] slice)."""
    plgpu = backend.mosaic_gpu_module()
    wgmma, wgmma_8bit = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA_8BIT
    groups = BLOCK_K // GROUP
    scale = plgpu.load(scales, (), layout=wgmma, optimized=False).astype(jnp.float32)  # [BLOCK_N, groups]
    scale_col = plgpu.broadcasted_iota(jnp.int32, (BLOCK_N, groups), 1, layout=wgmma)
    for g in range(groups):
        cols = pl.ds(g * GROUP, GROUP)
        per_row = jnp.where(scale_col == g, scale, 0.0).sum(axis=1)  # [BLOCK_N]: group g's scales
        s = plgpu.layout_cast(lax.broadcast_in_dim(per_row, (BLOCK_N, GROUP), [0]), wgmma_8bit)
        q = plgpu.load(codes, (slice(None), cols), layout=wgmma_8bit).astype(jnp.float32)
        w_buf[:, cols] = (q * s).astype(dtype)


def kernel(
    # inputs
    x_ref,  # [M', K] bf16/f16: the activations, rows padded to a multiple of 8 (at least block_m)
    codes_ref,  # [N, K] int8
    scales_ref,  # [N, K / 32] f16
    # outputs
    o_ref,  # [S, N, M'] float32: each split's partial product, transposed
    *,
    block_m: int,
    num_stages: int,
    steps: int,  # K steps per split
):
    plgpu = backend.mosaic_gpu_module()
    s, i, j = lax.axis_index("split"), lax.axis_index("row"), lax.axis_index("col")
    rows, dtype = x_ref.shape[0], x_ref.dtype
    n0 = pl.multiple_of(j * BLOCK_N, 8)  # rows past N: TMA reads zeros, the store drops them
    r0 = pl.multiple_of(jnp.minimum(i * block_m, rows - block_m), 8)  # the last row block slides back to end at M'
    first = s * steps

    def ring(x_smem, c_smem, s_smem, w_smem, w_barriers, x_barriers, acc_ref):
        # x_smem [stages, bm, BK]; c_smem [stages, BN, BK]; s_smem [stages, BN, BK / 32]; w_smem [2, BN, BK];
        # per slot one barrier for its codes and scales, one for its activations
        def k_start(t):  # first K column of the split's step t
            return pl.multiple_of((first + t) * BLOCK_K, BLOCK_K)

        def fetch_weights(t, slot):
            k0 = k_start(t)
            groups = pl.ds(lax.div(k0, jnp.int32(GROUP)), BLOCK_K // GROUP)
            rows_n = pl.ds(n0, BLOCK_N)
            plgpu.copy_gmem_to_smem(codes_ref.at[rows_n, pl.ds(k0, BLOCK_K)], c_smem.at[slot], w_barriers.at[slot])
            plgpu.copy_gmem_to_smem(scales_ref.at[rows_n, groups], s_smem.at[slot], w_barriers.at[slot])

        def fetch_x(t, slot):
            src = x_ref.at[pl.ds(r0, block_m), pl.ds(k_start(t), BLOCK_K)]
            plgpu.copy_gmem_to_smem(src, x_smem.at[slot], x_barriers.at[slot])

        for t in range(min(num_stages, steps)):  # the first steps all in flight before any wait
            fetch_weights(t, t)
            fetch_x(t, t)

        def step(k, carry):
            slot, buf = lax.rem(k, jnp.int32(num_stages)), lax.rem(k, jnp.int32(2))
            plgpu.barrier_wait(w_barriers.at[slot])
            # buffer `buf` was last read by the MMA of step k - 2, complete since step k - 1's wgmma_wait(1)
            _dequantize(c_smem.at[slot], s_smem.at[slot], w_smem.at[buf], dtype)
            plgpu.commit_smem()  # the tile visible to the MMA (async proxy); every warp past its code reads

            @pl.when(k + num_stages < steps)
            def _refill_weights():  # the codes and scales are in registers already
                fetch_weights(k + num_stages, slot)

            plgpu.barrier_wait(x_barriers.at[slot])
            plgpu.wgmma(acc_ref, w_smem.at[buf], plgpu.transpose_ref(x_smem.at[slot], (1, 0)))
            plgpu.wgmma_wait(1)  # the MMA of step k - 1 has completed: its activations' slot may be refilled

            @pl.when((k >= 1) & (k - 1 + num_stages < steps))
            def _refill_x():
                fetch_x(k - 1 + num_stages, lax.rem(k - 1, jnp.int32(num_stages)))

            return carry

        lax.fori_loop(0, steps, step, None)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(
        ring,
        plgpu.SMEM((num_stages, block_m, BLOCK_K), dtype, transforms=group_tiles(dtype)),
        plgpu.SMEM((num_stages, BLOCK_N, BLOCK_K), jnp.int8, transforms=group_tiles(jnp.int8)),
        plgpu.SMEM((num_stages, BLOCK_N, BLOCK_K // GROUP), jnp.float16),
        plgpu.SMEM((2, BLOCK_N, BLOCK_K), dtype, transforms=group_tiles(dtype)),
        plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),
        plgpu.ACC((BLOCK_N, block_m), jnp.float32),
    )

    def store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, pl.ds(n0, BLOCK_N), pl.ds(r0, block_m)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((BLOCK_N, block_m), jnp.float32))
