"""Multi-token attention over a contiguous KV cache with the Mosaic GPU lowering (Hopper): prefill, prompt chunks
and speculative verification as one flash-attention kernel (issue 20; docs/attention.md).

``q [T, N, D]`` is a flat batch of query tokens; sequence ``b``'s ``counts[b]`` queries are rows
``q_starts[b] ..`` at positions ``lengths[b] ..``, their K/V already written to the cache. Query ``i`` at position
``p`` attends causally to ``max(0, p - window + 1) <= s <= p``; query head ``n`` reads kv head ``n // G``; the
logits may be soft-capped (``c * tanh(x / c)``); rows no sequence owns give 0. Softmax in float32, output in
``q.dtype``. Plain 16-bit caches (bf16/f16, the MMA's inputs), ``D`` in 64/128/256.

The kernel (``jax.experimental.pallas.mosaic_gpu``; Hopper and later):

* a tile is ``block_q`` query tokens of one sequence x ``heads_per_tile`` query heads of one kv head, 64 rows in
  all (a warpgroup MMA's M), head-major: row ``r`` is head ``r // block_q``, token ``r % block_q``. Several
  heads per tile make a short query run (T = 5 verification) fill the MMA while reading each K/V block once per
  kv head; for a long prompt the work per K/V block is the same as one head per tile;
* the tile table (``multi_token_tiles.tile_table``, ``jnp`` outside the kernel) gives each tile's sequence, rows,
  positions, key range and loop bounds, longest loops first; tiles over rows no sequence owns store zeros; the
  grid is static (``(N / heads_per_tile, max tiles)``). A tile starts on an 8-row boundary of ``q`` (tiled TMA
  copies need that): rows before the sequence's first are another's, computed and never stored;
* one warpgroup per program: the query tile in shared memory is the left MMA operand; K and V blocks of
  ``block_k`` positions stream through a ``num_stages``-slot TMA ring from the window start to the tile's last
  position, each slot refilled once the MMA reading it has completed; ``s = q @ K^T`` and ``acc += p @ V`` are
  warpgroup MMAs into float32, online softmax in base 2. Blocks inside every row's causal and window limits run
  unmasked; the others mask the scores and zero the V rows outside the tile's key range in shared memory first
  (a 0 weight times a NaN in an unreadable position would be NaN);
* the output tile goes through an untiled shared-memory buffer to ``o`` in power-of-two row pieces (a TMA copy has
  a static size), so only the sequence's rows are written.

Launch parameters: :class:`MgpuMultiTokenConfig`, :func:`mgpu_multi_token_config`. Paged K/V:
``multi_token_mgpu_paged``; two consumer warpgroups and a producer: ``multi_token_mgpu_ws``.
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
from pallas_kernels.multi_token_tiles import ALIGN, NCOL, check_args, tile_table

ROWS = 64  # rows of a warpgroup MMA: block_q tokens x heads_per_tile query heads
HEAD_DIMS = (64, 128, 256)  # multiples of the 64-element (128-byte) swizzle; 256 is the widest MMA
CACHE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # the 16-bit MMA inputs
BLOCK_KS = (64, 128)  # 64: the decode kernel's verified block; 128 only measured against it (see the docs)
MGPU_SMEM_RESERVE = 7 * 1024  # shared memory Mosaic GPU takes beside our buffers (as in decode_mgpu)
LOG2E = math.log2(math.e)


class MgpuMultiTokenConfig(NamedTuple):
    """Launch parameters (static: each distinct value compiles its own kernel)."""

    block_q: int  # query tokens per tile (a multiple of 8); block_q * heads_per_tile = ROWS
    heads_per_tile: int  # query heads of one kv head per tile (divides G)
    block_k: int  # key positions per ring slot (BLOCK_KS)
    num_stages: int  # ring slots: K/V blocks in flight per program


def mgpu_multi_token_config(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> MgpuMultiTokenConfig:
    """The default: as many of a kv head's query heads per tile as divide G among 8/4/2/1 (a tile keeps at least
    8 tokens), 64-position blocks and a two-slot ring (at D <= 128 the buffers leave room for two programs per
    multiprocessor, whose softmax and MMAs then overlap)."""
    del head_dim, dtype  # one block size and ring depth for every supported head_dim and 16-bit dtype
    group = num_q_heads // num_kv_heads
    heads = next(h for h in (8, 4, 2, 1) if group % h == 0)
    return MgpuMultiTokenConfig(block_q=ROWS // heads, heads_per_tile=heads, block_k=64, num_stages=2)


def smem_bytes(config: MgpuMultiTokenConfig, head_dim: int, itemsize: int, out_itemsize: int, consumers=1) -> int:
    """Shared memory of one program: query and output tiles (one each per consumer warpgroup) and the K/V ring."""
    ring = config.num_stages * 2 * config.block_k * head_dim * itemsize
    return consumers * ROWS * head_dim * (itemsize + out_itemsize) + ring


def mgpu_unsupported_reason(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> str | None:
    """Why this kernel cannot take the shape and cache dtype (None: it can), whatever the machine."""
    if jnp.dtype(dtype) not in CACHE_DTYPES:
        return f"the Mosaic GPU kernel takes {[str(t) for t in CACHE_DTYPES]} K/V (16-bit MMA inputs), got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"head_dim={head_dim} is not supported by the Mosaic GPU kernel; expected one of {HEAD_DIMS}"
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
    return None


def mgpu_supported(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> bool:
    """Whether :func:`multi_token_attention_mgpu` takes these heads, head_dim and cache dtype (any T, B, S, G)."""
    return mgpu_unsupported_reason(num_q_heads, num_kv_heads, head_dim, dtype) is None


# ----------------------------------------------------------------------------------------------- kernel


def _swizzled(dtype):
    """Shared-memory transforms of an MMA operand: 8 x 128-byte tiles, 128-byte swizzle."""
    plgpu = backend.mosaic_gpu_module()
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _kernel(
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
    config: MgpuMultiTokenConfig,
    group: int,
    scale: float,
    window: int | None,
    softcap: float | None,
    pages_per_seq: int | None,  # M: the block table's columns (None: a contiguous cache)
):
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    block_q, heads, block_k, stages = config
    num_layers, num_pages, _, max_len, head_dim = k_ref.shape
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

    def window_start(t):  # first position loaded for block t: the block itself, slid back to end inside S
        return pl.multiple_of(jnp.minimum(t * block_k, max_len - block_k), ALIGN)

    def attend(q_smem, k_smem, v_smem, q_barriers, k_barriers, v_barriers):
        # q_smem [ROWS, D]; k_smem, v_smem [stages, bk, D]; one barrier per query head and per slot and operand
        def fetch(ref, smem, barriers, i, slot):  # K or V of the loop's block i into a ring slot
            start = window_start(t_lo + i)
            if pages_per_seq is None:
                src = ref.at[layer, b, kv_head, pl.ds(start, block_k)]
                plgpu.copy_gmem_to_smem(src, smem.at[slot], barriers.at[slot])
                return
            first = b * pages_per_seq + lax.div(start, jnp.int32(page_size))
            for j in range(block_k // page_size):  # one copy per page, all arriving on the slot's barrier
                page = jnp.minimum(jnp.maximum(pages_ref[first + j], 0), num_pages - 1)  # < 0: masked positions
                dst = smem.at[slot, pl.ds(j * page_size, page_size)]
                plgpu.copy_gmem_to_smem(ref.at[layer, page, kv_head], dst, barriers.at[slot])

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
            acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32 (m in base-2 units)
            t = t_lo + i
            slot = lax.rem(i, jnp.int32(stages))
            start = window_start(t)
            plgpu.barrier_wait(k_barriers.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_k), jnp.float32))  # [ROWS, bk]

            @pl.when(i + stages < steps)
            def _refill_k():  # the scores were read: the MMA reading this K slot has completed
                plgpu.commit_smem()  # fence + warpgroup barrier: every warp is past its reads of the slot
                fetch_k(i + stages, slot)

            if softcap is None:
                s = s * (scale * LOG2E)
            else:
                s = jnp.tanh(s * (scale / softcap)) * (softcap * LOG2E)
            if masked:
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

            plgpu.barrier_wait(v_barriers.at[slot])
            if masked:
                keep_lo = jnp.maximum(lo, t * block_k)

                @pl.when((start < keep_lo) | (start + block_k > hi))
                def _zero_outside():  # V rows outside the tile's key range may be NaN: zero them
                    v_slot = v_smem.at[slot]
                    v = v_slot[...]
                    rows = start + plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0, layout=wgmma_layout)
                    v_slot[...] = jnp.where((rows >= keep_lo) & (rows < hi), v, 0)
                    plgpu.commit_smem()  # visible to the MMA (async proxy)

            acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot]))(
                plgpu.ACC.init(acc)
            )

            @pl.when(i + stages < steps)
            def _refill_v():  # the second MMA reading this slot has completed (its result was read)
                plgpu.commit_smem()
                fetch_v(i + stages, slot)

            return acc, m_new, denom

        carry = (
            plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)),
        )
        masked = functools.partial(step, masked=True)
        carry = lax.fori_loop(0, u_lo - t_lo, masked, carry)  # the window's edge
        carry = lax.fori_loop(u_lo - t_lo, u_hi - t_lo, functools.partial(step, masked=False), carry)
        return lax.fori_loop(u_hi - t_lo, steps, masked, carry)  # the causal diagonal

    acc, _, denom = pl.run_scoped(
        attend,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=_swizzled(dtype)),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=_swizzled(dtype)),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=_swizzled(dtype)),
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


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "pages_per_seq"))
def _attend(q, k, v, pages, q_starts, lengths, counts, layer, *, scale, window, softcap, config, pages_per_seq=None):
    # q [T, N, D]; k, v [L, B, K, S, D] (S a multiple of 8, >= block_k) or pools [L, P, K, page_size, D] with
    # pages int32[B * M] (else unused); q_starts, lengths, counts int32[B]; layer int32[1]
    plgpu = backend.mosaic_gpu_module()
    num_rows, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    table = tile_table(
        q_starts, lengths, counts, num_rows=num_rows, block_q=config.block_q, block_k=config.block_k, window=window
    )
    options = dict(scale=scale, window=window, softcap=softcap, pages_per_seq=pages_per_seq)
    body = functools.partial(_kernel, config=config, group=group, **options)

    def jkv_multi_token_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    rows = _round_up(num_rows, ALIGN)
    q_in = q.astype(k.dtype)  # the MMA takes the cache's dtype (a copy of q only where they differ)
    if rows != num_rows:  # whole 8-row tiles (a copy of q; the step's token buckets are multiples of 8)
        q_in = jnp.pad(q_in, ((0, rows - num_rows), (0, 0), (0, 0)))
    out = plgpu.kernel(
        jkv_multi_token_attention_mgpu,
        out_type=jax.ShapeDtypeStruct((rows, num_heads, head_dim), q.dtype),
        grid=(num_heads // config.heads_per_tile, table.shape[0]),
        grid_names=("heads", "tile"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(table.reshape(-1), layer, pages, q_in, k, v)
    return out if rows == num_rows else out[:num_rows]


# ----------------------------------------------------------------------------------------------- public


def check_mgpu_args(q, k, v, q_starts, lengths, counts, layer=None, *, window=None, softcap=None):
    """``multi_token_tiles.check_args``, then what this kernel adds (:func:`mgpu_unsupported_reason`)."""
    t, n, kh, s, d = check_args(q, k, v, q_starts, lengths, counts, layer, window=window, softcap=softcap)
    if (reason := mgpu_unsupported_reason(n, kh, d, k.dtype)) is not None:
        raise (TypeError if jnp.dtype(k.dtype) not in CACHE_DTYPES else ValueError)(reason)
    return t, n, kh, s, d


def resolve_config(config, num_heads, kv_heads, head_dim, dtype, out_dtype, consumers=1) -> MgpuMultiTokenConfig:
    """``config`` (None: :func:`mgpu_multi_token_config`), checked against the MMA and shared memory."""
    if config is None:
        config = mgpu_multi_token_config(num_heads, kv_heads, head_dim, dtype)
    if not isinstance(config, MgpuMultiTokenConfig):
        raise TypeError(f"config must be an MgpuMultiTokenConfig or None, got {config!r}")
    for name, value in config._asdict().items():
        if not common.is_int(value) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive int")
    if config.block_q * config.heads_per_tile != ROWS or config.block_q % ALIGN:
        raise ValueError(
            f"config.block_q={config.block_q} x heads_per_tile={config.heads_per_tile} must be {ROWS} rows, "
            f"block_q a multiple of {ALIGN}"
        )
    if (num_heads // kv_heads) % config.heads_per_tile:
        raise ValueError(f"config.heads_per_tile={config.heads_per_tile} must divide G={num_heads // kv_heads}")
    if config.block_k not in BLOCK_KS:
        raise ValueError(f"config.block_k={config.block_k} must be one of {BLOCK_KS}")
    need = smem_bytes(config, head_dim, jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize, consumers)
    budget = backend.shared_memory_per_block() - MGPU_SMEM_RESERVE
    if need > budget:
        raise ValueError(f"{config} needs {need} bytes of shared memory at head_dim={head_dim}, more than {budget}")
    return config


def multi_token_attention_mgpu(
    q: Float[Array, "T N D"],
    k: Float[Array, "*L B K S D"],
    v: Float[Array, "*L B K S D"],
    q_starts: Int[Array, " B"],
    lengths: Int[Array, " B"],
    counts: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    config: MgpuMultiTokenConfig | None = None,
) -> Float[Array, "T N D"]:
    """Causal attention of a flat batch of query tokens over a contiguous cache (Mosaic GPU; see the module doc).

    ``layer`` selects the layer of a whole ``[L, B, K, S, D]`` cache inside the kernel (no copy of the layer).
    ``scale`` defaults to ``D ** -0.5``; ``window`` (keys ``p - window + 1 .. p``) and ``softcap`` are static.
    Raises ``RuntimeError`` where Mosaic GPU cannot run (no Hopper GPU, or a JAX build without
    ``jax.experimental.pallas.mosaic_gpu``): this kernel has no interpret mode.

    Example: two sequences, one prefilling 5 tokens into an empty cache, one verifying 3 after 100 cached::

        out = multi_token_attention_mgpu(q[:8], k, v, q_starts=[0, 5], lengths=[0, 100], counts=[5, 3])
    """
    q_starts, lengths, counts = (jnp.asarray(x).astype(jnp.int32) for x in (q_starts, lengths, counts))
    _, n, kh, _, d = check_mgpu_args(q, k, v, q_starts, lengths, counts, layer, window=window, softcap=softcap)
    config = resolve_config(config, n, kh, d, k.dtype, q.dtype)
    if not backend.mosaic_gpu_usable():
        raise RuntimeError(
            f"the Mosaic GPU multi-token kernel cannot run here: {backend.mosaic_gpu_unavailable_reason()}"
        )
    return _prepared_call(q, k, v, q_starts, lengths, counts, layer, scale, window, softcap, config)


def _prepared_call(q, k, v, q_starts, lengths, counts, layer, scale, window, softcap, config):
    """The kernel call on checked arguments: the one-layer cache as a whole one, S padded to whole 8-row tiles."""
    scale = common.softmax_scale(scale, q.shape[-1])
    if k.ndim == 4:
        k, v, layer = k[None], v[None], 0  # a free reshape, not a copy
    s = k.shape[3]
    padded = max(config.block_k, _round_up(s, ALIGN))
    if padded != s:  # a tiny cache, or S off the 8-row tile: pad it (a copy of the cache; never at usual sizes)
        pad = [(0, 0)] * 3 + [(0, padded - s), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    softcap = None if softcap is None else float(softcap)
    options = dict(scale=scale, window=window, softcap=softcap, config=config)
    return _attend(q, k, v, jnp.zeros((1,), jnp.int32), q_starts, lengths, counts, layer, **options)
