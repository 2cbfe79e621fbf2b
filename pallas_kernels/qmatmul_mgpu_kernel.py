"""The Mosaic GPU quantized matmul's kernel body (Hopper: TMA ring + dequantization in registers + warpgroup MMA),
for ``pallas_kernels.qmatmul_mgpu``. The product is computed transposed, ``W_tile @ x_tile^T``, so the weights'
``BLOCK_N`` rows are the MMA's 64 rows and the activations' few rows its narrow N (8-64): a decode step wastes no
MMA rows on padding.

* one program (one warpgroup) per ``(K split, row block of x, column block of BLOCK_N weight rows)``;
* each step's windows of the weight planes (``qmatmul_mgpu_formats``: codes or nibbles ``[BLOCK_N, BLOCK_K]``,
  their scales) and of the activations' parts ``[block_m, BLOCK_K]`` come by TMA into a ring of ``num_stages``
  shared-memory slots (one more for the activations, which the MMA frees a step later), each half on its own
  barriers. Rows past ``N`` read as zeros (TMA) and their outputs are dropped by the store;
* the warpgroup dequantizes the slot in registers (float32, rounded to the activations' dtype) into the
  ``parts`` tiles ``[BLOCK_N, BLOCK_K]`` of one of two buffers (``qmatmul_mgpu_formats``: one scale group per
  tile column, no reshape); the slot's weight windows are then refilled with the step ``num_stages`` ahead.
  Both MMA operands are in shared memory (a register operand gave wrong rows in the decode kernel:
  docs/notes/decode_kernel.md, v7);
* the ``wgmma`` of step ``k`` (one per part) runs while step ``k + 1`` is dequantized into the other buffer;
  once it is known complete (``wgmma_wait(1)`` after the next one is issued), its activations' slot is refilled;
* the float32 accumulator ``[BLOCK_N, block_m]`` goes through shared memory to the partials ``[S, N, M']``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend
from pallas_kernels.qmatmul_mgpu_formats import BLOCK_K, BLOCK_N, CODE_TILE, FORMATS, tile_transforms


def kernel(
    # inputs
    x_ref,  # [P, M', K / P] bf16/f16: the activations' parts, rows padded to a multiple of 8 (at least block_m)
    *refs,  # the weight planes [N, ...] (block_formats' order); the output [S, N, M'] float32: each split's
    # partial product, transposed
    fmt: str,
    block_m: int,
    num_stages: int,
    steps: int,  # K steps per split
):
    plgpu = backend.mosaic_gpu_module()
    spec = FORMATS[fmt]
    plane_refs, o_ref = refs[:-1], refs[-1]
    s, i, j = lax.axis_index("split"), lax.axis_index("row"), lax.axis_index("col")
    parts, rows, dtype = x_ref.shape[0], x_ref.shape[1], x_ref.dtype
    n0 = pl.multiple_of(j * BLOCK_N, 8)  # rows past N: TMA reads zeros, the store drops them
    r0 = pl.multiple_of(jnp.minimum(i * block_m, rows - block_m), 8)  # the last row block slides back to end at M'
    first = s * steps
    x_slots = num_stages + 1

    def ring(x_smem, w_smem, w_barriers, x_barriers, acc_ref, *window_smem):
        # x_smem [stages + 1, P, bm, BK]; w_smem [2, P, BN, BK]; window_smem [stages, BN, cols] per plane; per
        # slot one barrier for the weight windows, one for the activations (one slot more: they are freed a step
        # later, by the MMA)
        # one barrier for the weight windows, one for the activations
        def k_start(t):  # first packed column of the split's step t
            return pl.multiple_of((first + t) * BLOCK_K, BLOCK_K)

        def fetch_weights(t, slot):
            k0 = k_start(t)
            for ref, smem, window in zip(plane_refs, window_smem, spec.windows, strict=True):
                src = ref.at[pl.ds(n0, BLOCK_N), pl.ds(window.start(k0), window.cols)]
                plgpu.copy_gmem_to_smem(src, smem.at[slot], w_barriers.at[slot])

        def fetch_x(t, slot):
            for p in range(parts):
                src = x_ref.at[p, pl.ds(r0, block_m), pl.ds(k_start(t), BLOCK_K)]
                plgpu.copy_gmem_to_smem(src, x_smem.at[slot, p], x_barriers.at[slot])

        for t in range(min(num_stages + 1, steps)):  # the first steps all in flight before any wait
            if t < num_stages:
                fetch_weights(t, t)
            fetch_x(t, t)

        def step(k, carry):
            slot, x_slot, buf = (lax.rem(k, jnp.int32(c)) for c in (num_stages, x_slots, 2))
            plgpu.barrier_wait(w_barriers.at[slot])
            # buffer `buf` was last read by the MMAs of step k - 2, complete since step k - 1's wgmma_wait(1)
            windows = [smem.at[slot] for smem in window_smem]
            spec.dequantize(windows, [w_smem.at[buf, p] for p in range(parts)], dtype, k_start(k))
            plgpu.commit_smem()  # the tiles visible to the MMA (async proxy); every warp past its window reads

            @pl.when(k + num_stages < steps)
            def _refill_weights():  # the windows are in registers already
                fetch_weights(k + num_stages, slot)

            plgpu.barrier_wait(x_barriers.at[x_slot])
            for p in range(parts):
                plgpu.wgmma(acc_ref, w_smem.at[buf, p], plgpu.transpose_ref(x_smem.at[x_slot, p], (1, 0)))
            plgpu.wgmma_wait(1)  # only the newest MMA may still run: step k - 1's slot may be refilled

            @pl.when((k >= 1) & (k - 1 + x_slots < steps))
            def _refill_x():  # with the step num_stages ahead, as the weights
                fetch_x(k - 1 + x_slots, lax.rem(k - 1, jnp.int32(x_slots)))

            return carry

        lax.fori_loop(0, steps, step, None)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    windows = []
    for plane, window in zip(plane_refs, spec.windows, strict=True):
        transforms = tile_transforms(plane.dtype, CODE_TILE) if window.tiled else ()
        windows.append(plgpu.SMEM((num_stages, BLOCK_N, window.cols), plane.dtype, transforms=transforms))
    acc = pl.run_scoped(
        ring,
        plgpu.SMEM((x_slots, parts, block_m, BLOCK_K), dtype, transforms=tile_transforms(dtype, spec.group)),
        plgpu.SMEM((2, parts, BLOCK_N, BLOCK_K), dtype, transforms=tile_transforms(dtype, spec.group)),
        plgpu.Barrier(num_arrivals=len(spec.windows), num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=parts, num_barriers=x_slots),
        plgpu.ACC((BLOCK_N, block_m), jnp.float32),
        *windows,
    )

    def store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, pl.ds(n0, BLOCK_N), pl.ds(r0, block_m)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((BLOCK_N, block_m), jnp.float32))
