"""What the Mosaic GPU attention kernels (``decode_mgpu*``, ``multi_token_mgpu*``) share: the MMA's row count and
operand dtypes, shared-memory layout and budget, and the warpgroup-MMA steps of a flash-attention loop written once
(each kernel keeps its own masking and online softmax)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

ROWS = 64  # rows of a warpgroup MMA
HEAD_DIMS = (64, 128, 256)  # multiples of the 64-element (128-byte) swizzle; 256 is the widest MMA
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the 16-bit MMA inputs (no transposed f32)
# Shared memory Mosaic GPU takes beside our buffers (Hopper: 227 - 7 = 220 KiB for those).
MGPU_SMEM_RESERVE = 7 * 1024


def unsupported_reason(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> str | None:
    """Why a Mosaic GPU attention kernel cannot take these heads, head_dim and cache dtype (None: it can), any
    machine: 16-bit MMA inputs, a head_dim the swizzle tiles, whole groups of query heads."""
    if jnp.dtype(dtype) not in CACHE_DTYPES:
        names = [str(t) for t in CACHE_DTYPES]
        return (
            f"the Mosaic GPU kernel takes {names} K/V (16-bit MMA inputs; the Triton kernels take float32), got {dtype}"
        )
    if head_dim not in HEAD_DIMS:
        return f"head_dim={head_dim} is not supported by the Mosaic GPU kernel; expected one of {HEAD_DIMS}"
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
    return None


def refuse(reason: str | None, dtype) -> None:
    """Raise ``reason`` (if any): ``TypeError`` for a cache dtype the MMA cannot take, else ``ValueError``."""
    if reason is not None:
        raise (TypeError if jnp.dtype(dtype) not in CACHE_DTYPES else ValueError)(reason)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def swizzled(dtype):
    """Shared-memory transforms of an MMA operand: 8 x 128-byte tiles, 128-byte swizzle."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def initial_carry(head_dim: int):
    """The online softmax's start, in the MMA's register layout: ``acc [ROWS, D]`` zeros, running max ``-inf``
    and denominator zeros ``[ROWS]`` (float32)."""
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    return (
        plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
        plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1)),
        plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)),
    )


def mma_scores(q, k_smem, slot, block_k: int, *, issued=None):
    """``q @ K^T`` of ring slot ``slot`` (``k_smem [stages, bk, D]``) as a warpgroup MMA: float32 ``[ROWS, bk]``
    in registers. ``q``: ``[ROWS, D]`` registers or shared memory. ``issued()`` (if given) runs once the MMA is
    issued, before its result is waited for."""
    plgpu = backend.mosaic_gpu_module()

    def qk(s_ref):
        plgpu.wgmma(s_ref, q, k_smem.at[slot].transpose((1, 0)))
        if issued is not None:
            issued()
        return s_ref[...]

    return pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))


def mma_accumulate(acc, p, v_smem, slot, *, issued=None):
    """``acc + p @ V`` of ring slot ``slot`` as a warpgroup MMA (``p`` cast to the slot's dtype); ``issued()``
    (if given) runs once the MMA is issued, before its result is waited for."""
    plgpu = backend.mosaic_gpu_module()

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])
        if issued is not None:
            issued()

    return pl.run_state(pv)(plgpu.ACC.init(acc))


def ring_scores(q, k_smem, k_barriers, slot, block_k: int, *, refill, fetch):
    """Wait for ring slot ``slot``'s K block, then ``q @ K^T`` (:func:`mma_scores`); once the scores are read the
    MMA reading the slot has completed, and where ``refill()`` the slot is refilled by ``fetch()`` (both called
    inside, so their operations follow the product's)."""
    plgpu = backend.mosaic_gpu_module()
    plgpu.barrier_wait(k_barriers.at[slot])
    s = mma_scores(q, k_smem, slot, block_k)  # [ROWS, bk]

    @pl.when(refill())
    def _refill_k():
        plgpu.commit_smem()  # fence + warpgroup barrier: every warp is past its reads of the slot
        fetch()

    return s


def ring_accumulate(acc, p, v_smem, slot, *, refill, fetch):
    """``acc + p @ V`` of ring slot ``slot`` (:func:`mma_accumulate`); where ``refill()``, the slot is then refilled
    by ``fetch()`` (the second MMA reading it has completed: its result was read)."""
    plgpu = backend.mosaic_gpu_module()
    acc = mma_accumulate(acc, p, v_smem, slot)

    @pl.when(refill())
    def _refill_v():
        plgpu.commit_smem()  # fence + warpgroup barrier: every warp is past its reads of the slot
        fetch()

    return acc
