"""Decode attention over a contiguous KV cache with the Mosaic GPU lowering (Hopper): TMA ring + warpgroup MMAs.

Same call shape and semantics as :func:`pallas_kernels.decode.decode_attention`: ``q [B, N, D]``;
``k``, ``v`` either ``[B, K, S, D]`` or a whole ``[L, B, K, S, D]`` cache with ``layer`` (int or traced int32
scalar); ``lengths int[B]`` (0 gives zeros); query head ``n`` reads kv head ``n // G``; softmax in float32; the
output has ``q.dtype``. The arguments are validated by ``pallas_kernels.common.check_args``, and the split-K
partials are merged by ``pallas_kernels.common.merge_partials``.

The kernel (``jax.experimental.pallas.mosaic_gpu``; Hopper and later, no interpret mode):

* one program (one warpgroup, 128 threads) per ``(split, kv head, b)``; the ``G`` query heads of the kv head are
  ``G`` rows of a 64-row query tile (a warpgroup MMA has 64 rows), held in registers as the MMA's left operand.
  Tiled TMA copies start on the 8-row tile, so the tile is the 64-row window of ``q`` from the multiple of 8 at
  or below the head's first row (all of ``q``'s rows where it has fewer than 64); the other rows are zeroed in
  registers and never stored;
* K and V blocks of ``block_k`` positions stream through a ring of ``num_stages`` shared-memory slots filled by
  TMA bulk copies, each completing on its own barrier; a slot's K is refilled with the block ``num_stages``
  ahead as soon as the block's scores are read, its V once the second MMA has completed, so up to
  ``num_stages`` blocks are in flight per program;
* ``s = q @ K^T`` and ``acc += p @ V`` are warpgroup MMAs (``wgmma``) into float32; the online softmax runs in
  base 2 on the MMA's register layout;
* split ``j`` walks its share of the ``cdiv(lengths[b], block_k)`` blocks (a length-driven loop: blocks past a
  length are never read). A block that would run past ``S`` slides back to end at ``S`` (positions already
  counted are masked); in the block that ends past the length, the V rows past it are zeroed in shared memory
  before the MMA (a 0 weight times a NaN in an unused slot would still be NaN);
* one split: the kernel normalises and stores the ``G`` output rows; several: it stores ``acc`` and the rows'
  statistics (running max, softmax denominator) and ``pallas_kernels.common.merge_partials`` merges them.

Launch parameters come from :func:`mgpu_config` and can be overridden per call. Measured against the Triton
kernel and torch in docs/notes/decode_kernel.md; where the dispatch takes it: ``pallas_kernels.dispatch``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, common

ROWS = 64  # rows of a warpgroup MMA: the query tile holds the G query heads of a kv head, padded with zeros
HEAD_DIMS = (64, 128, 256)  # multiples of the 64-element (128-byte) swizzle; 256 is the widest MMA
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the 16-bit MMA inputs (no transposed f32)
BLOCK_K = 64  # 128 compiled and ran but gave wrong results on jax 0.11.2 (see docs/notes/decode_kernel.md)
DEFAULT_STAGES = 2
# Shared memory Mosaic GPU takes beside the K/V ring and the query tile (Hopper: 227 - 7 = 220 KiB for those).
MGPU_SMEM_RESERVE = 7 * 1024
LOG2E = math.log2(math.e)
STATS = 32  # float32 columns of a split's per-row statistics (max, denominator): 128-byte rows


class MgpuConfig(NamedTuple):
    """Launch parameters of the Mosaic GPU decode kernel (static: each distinct value compiles its own kernel)."""

    block_k: int  # positions per ring slot (BLOCK_K)
    num_splits: int  # programs per (b, kv head), each walking an equal share of the sequence's blocks
    num_stages: int  # ring slots: K/V blocks in flight per program


def smem_budget() -> int:
    """Shared memory the K/V ring and the query tile of one program may take on this device."""
    return backend.shared_memory_per_block() - MGPU_SMEM_RESERVE


def _ring_bytes(block_k: int, head_dim: int, itemsize: int, stages: int) -> int:
    return stages * 2 * block_k * head_dim * itemsize


def mgpu_config(
    batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, *, num_multiprocessors: int | None = None
) -> MgpuConfig:
    """Default launch parameters: 64-position blocks, a two-slot ring, and splits so that about one program per
    multiprocessor runs (``floor(SMs / (B * K))`` splits, at least one), each split an equal share of the
    blocks and at least two of them.

    Measured (docs/notes/decode_kernel.md): one program per multiprocessor beat two, and two slots did as well
    as three (four, at one program per multiprocessor, was slower). A two-slot ring of 64 x 128 bf16 blocks
    (64 KiB) and the query tile leave room for two programs per multiprocessor where the batch asks for more
    programs than multiprocessors.
    """
    del dtype, head_dim  # one block size and ring depth for every supported head_dim and 16-bit dtype
    sms = num_multiprocessors or backend.num_multiprocessors()
    block_k = BLOCK_K
    blocks = max(1, math.ceil(max_len / block_k))
    splits = max(1, min(sms // (batch * num_kv_heads), blocks // 2))
    splits = math.ceil(blocks / math.ceil(blocks / splits))  # equal shares: no split left empty at full length
    return MgpuConfig(block_k, splits, DEFAULT_STAGES)


# ----------------------------------------------------------------------------------------------- kernel


def _swizzled(dtype):
    """Shared-memory transforms of an MMA operand: 8 x 128-byte tiles, 128-byte swizzle."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    q_ref,  # [R, D]: the queries, one row per (b, query head), R = B * N rounded up to a multiple of 8
    k_ref,  # [L, B, K, S, D]: the whole cache (S a multiple of 8); the program reads its (layer, b, kv head) slab
    v_ref,  # [L, B, K, S, D]
    # outputs: o [B, N, D] (one split); or acc [B, K, P, G, D] and stats [B, K, P, G, STATS] (float32; stats
    # column 0 the running max, column 1 the softmax denominator)
    *out_refs,
    group: int,
    block_k: int,
    num_splits: int,
    num_stages: int,
    scale: float,
):
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    j, h, b = lax.axis_index("split"), lax.axis_index("kv_head"), lax.axis_index("batch")
    num_layers, _, num_kv_heads, max_len, head_dim = k_ref.shape
    dtype = k_ref.dtype
    # Lengths and layer were validated on the host when concrete; the clamps only keep traced values in bounds.
    n = jnp.minimum(jnp.maximum(lengths_ref[b], 0), max_len)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)
    lo, hi = common.split_blocks(n, j, block_k, num_splits)  # the Triton kernel body's shares
    steps = jnp.maximum(hi - lo, 0)

    # Tiled TMA copies start at multiples of the 8-row tile: this kv head's G query rows sit at `offset` in a
    # window of up to 64 rows from the multiple of 8 at or below its first row. The other rows of the window
    # belong to other heads (or lie past the end, where TMA fills zeros); they are zeroed in registers and never
    # stored.
    first_row = b * (num_kv_heads * group) + h * group
    window_row = pl.multiple_of(lax.div(first_row, jnp.int32(8)) * 8, 8)
    offset = first_row - window_row  # 0..7

    def window(t):  # first position loaded for block t: the block itself, slid back to end inside S
        return pl.multiple_of(jnp.minimum(t * block_k, max_len - block_k), 8)

    def ring(q_smem, k_smem, v_smem, q_barrier, k_barriers, v_barriers):
        # q_smem [ROWS, D]; k_smem, v_smem [stages, bk, D]; one barrier per ring slot and operand
        def fetch_k(t, slot):  # K of block t of the sequence into a ring slot
            rows = pl.ds(window(t), block_k)
            plgpu.copy_gmem_to_smem(k_ref.at[layer, b, h, rows], k_smem.at[slot], k_barriers.at[slot])

        def fetch_v(t, slot):
            rows = pl.ds(window(t), block_k)
            plgpu.copy_gmem_to_smem(v_ref.at[layer, b, h, rows], v_smem.at[slot], v_barriers.at[slot])

        def fetch(t, slot):
            fetch_k(t, slot)
            fetch_v(t, slot)

        # The query window and the first K/V blocks are all in flight before the program waits for any.
        # Fewer than 64 query rows in all (small batches): the window is all of them, into the tile's first rows
        # (the rest of the tile is never initialised; those rows are zeroed below, as are other heads' rows).
        q_window = min(ROWS, q_ref.shape[0])
        q_dst = q_smem if q_window == ROWS else q_smem.at[pl.ds(0, q_window)]
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(window_row, q_window)], q_dst, q_barrier.at[0])
        for i in range(num_stages):
            pl.when(i < steps)(functools.partial(fetch, lo + i, i))
        plgpu.barrier_wait(q_barrier.at[0])
        q = q_smem[...]  # [ROWS, D], the MMA register layout
        q_rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, head_dim), 0, layout=wgmma_layout)
        q = jnp.where((q_rows >= offset) & (q_rows < offset + group), q, 0).astype(dtype)

        def step(i, carry):
            acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32
            t = lo + i
            slot = lax.rem(i, jnp.int32(num_stages))
            start = window(t)

            plgpu.barrier_wait(k_barriers.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q, k_smem.at[slot].transpose((1, 0)))
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))  # [ROWS, bk]

            @pl.when(i + num_stages < steps)
            def _refill_k():  # the scores were read: the MMA reading this K slot has completed
                plgpu.commit_smem()  # fence + warpgroup barrier: every warp is past its reads of the slot
                fetch_k(t + num_stages, slot)

            pos = start + plgpu.broadcasted_iota(jnp.int32, (ROWS, block_k), 1, layout=wgmma_layout)
            s = jnp.where((pos >= t * block_k) & (pos < n), s * (scale * LOG2E), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))  # finite: every block holds a valid position
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

            acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot]))(
                plgpu.ACC.init(acc)
            )

            @pl.when(i + num_stages < steps)
            def _refill_v():  # the second MMA reading this slot has completed (its result was read)
                plgpu.commit_smem()  # fence + warpgroup barrier: every warp is past its reads of the slot
                fetch_v(t + num_stages, slot)

            return acc, m_new, denom

        init = (
            plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)),
        )
        return lax.fori_loop(0, steps, step, init)

    acc, m, denom = pl.run_scoped(
        ring,
        plgpu.SMEM((ROWS, head_dim), q_ref.dtype, transforms=_swizzled(q_ref.dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=_swizzled(dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=_swizzled(dtype)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
    )
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
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, STATS), 1, layout=wgmma_layout)
        m_nat = lax.broadcast_in_dim(m * (1.0 / LOG2E), (ROWS, STATS), [0])  # natural-log units
        stats_smem[...] = jnp.where(col == 0, m_nat, lax.broadcast_in_dim(denom, (ROWS, STATS), [0]))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem.at[mine], acc_ref.at[b, h, j])
        plgpu.copy_smem_to_gmem(stats_smem.at[mine], stats_ref.at[b, h, j])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store_partials, plgpu.SMEM((ROWS, head_dim), jnp.float32), plgpu.SMEM((ROWS, STATS), jnp.float32))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _decode(q, k, v, lengths, layer, *, scale: float, config: MgpuConfig):
    # q [B, N, D]; k, v [L, B, K, S, D] (S a multiple of 8, >= block_k); lengths int32[B]; layer int32[1]
    plgpu = backend.mosaic_gpu_module()
    _, batch, kv_heads, _, head_dim = k.shape
    group = q.shape[1] // kv_heads
    splits = config.num_splits
    rows = common.partial_rows(splits)  # the kernel writes the first `splits`
    if splits == 1:
        out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_type = (
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, STATS), jnp.float32),  # m, denom
        )
    body = functools.partial(
        _kernel,
        group=group,
        block_k=config.block_k,
        num_splits=splits,
        num_stages=config.num_stages,
        scale=scale,
    )

    def jkv_decode_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    q_rows = q.reshape(-1, head_dim)  # [B * N, D], a free reshape
    rows = _round_up(q_rows.shape[0], 8)
    if rows != q_rows.shape[0]:  # whole 8-row tiles (a copy of q; only where B * N is not a multiple of 8)
        q_rows = jnp.pad(q_rows, ((0, rows - q_rows.shape[0]), (0, 0)))
    outs = plgpu.kernel(
        jkv_decode_attention_mgpu,
        out_type=out_type,
        grid=(splits, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, layer, q_rows, k, v)
    if splits == 1:
        return outs
    acc, stats = outs
    flat = lambda x: x.reshape(batch * kv_heads, *x.shape[2:])  # free reshapes
    out = common.merge_partials(flat(acc), flat(stats), splits=splits, dtype=q.dtype, interpret=False)
    return out.reshape(q.shape)


# ----------------------------------------------------------------------------------------------- public


def _resolve_config(default: MgpuConfig, head_dim: int, itemsize: int, **overrides) -> MgpuConfig:
    for name, value in overrides.items():
        if value is not None and not common.is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    config = default._replace(**{k: int(x) for k, x in overrides.items() if x is not None})
    if config.block_k != BLOCK_K:
        raise ValueError(f"block_k={config.block_k} must be {BLOCK_K}")
    if config.num_splits < 1:
        raise ValueError(f"num_splits={config.num_splits} must be >= 1")
    if config.num_stages < 1:
        raise ValueError(f"num_stages={config.num_stages} must be >= 1")
    ring = _ring_bytes(config.block_k, head_dim, itemsize, config.num_stages) + ROWS * head_dim * 4
    if ring > smem_budget():
        raise ValueError(
            f"block_k={config.block_k}, num_stages={config.num_stages} need {ring} bytes of K/V ring and "
            f"query tile (head_dim={head_dim}), more than the {smem_budget()} a program may take"
        )
    return config


def check_mgpu_args(q, k, v, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """``pallas_kernels.common.check_args``, then what this kernel adds: 16-bit K/V, head_dim among
    ``HEAD_DIMS``, G <= 64."""
    b, n, kh, s, d = common.check_args(q, k, v, lengths, layer)
    if jnp.dtype(k.dtype) not in CACHE_DTYPES:
        raise TypeError(
            f"the Mosaic GPU kernel takes {[str(t) for t in CACHE_DTYPES]} K/V (16-bit MMA inputs), got {k.dtype}; "
            "pallas_kernels.decode.decode_attention takes float32"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported by the Mosaic GPU kernel; expected one of {HEAD_DIMS}")
    if n // kh > ROWS:
        raise ValueError(f"num_q_heads={n} // num_kv_heads={kh} = {n // kh} query heads per kv head exceeds {ROWS}")
    return b, n, kh, s, d


def decode_attention_mgpu(
    q: Float[Array, "B N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_stages: int | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` cache positions (Mosaic GPU).

    ``layer`` selects the layer of a whole ``[L, B, K, S, D]`` cache inside the kernel (no copy of the layer).
    ``scale`` defaults to ``D ** -0.5``. ``block_k``, ``num_splits`` and ``num_stages`` override
    :func:`mgpu_config`. Raises ``RuntimeError`` where Mosaic GPU cannot run (no Hopper GPU, or a JAX build
    without ``jax.experimental.pallas.mosaic_gpu``): this kernel has no interpret mode.
    """
    b, _, kh, s, d = check_mgpu_args(q, k, v, lengths, layer)
    if not backend.mosaic_gpu_usable():
        raise RuntimeError(f"the Mosaic GPU decode kernel cannot run here: {backend.mosaic_gpu_unavailable_reason()}")
    scale = common.softmax_scale(scale, d)
    itemsize = jnp.dtype(k.dtype).itemsize
    config = _resolve_config(
        mgpu_config(b, kh, s, d, k.dtype),
        d,
        itemsize,
        block_k=block_k,
        num_splits=num_splits,
        num_stages=num_stages,
    )
    if k.ndim == 4:
        k, v, layer = k[None], v[None], 0  # a free reshape, not a copy
    padded = max(config.block_k, _round_up(s, 8))
    if padded != s:  # a tiny cache, or S off the 8-row tile: pad it (a copy of the cache; never at usual sizes)
        pad = [(0, 0)] * 3 + [(0, padded - s), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _decode(q, k, v, lengths, layer, scale=float(scale), config=config)
