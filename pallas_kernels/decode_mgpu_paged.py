"""Decode attention over a paged KV cache with the Mosaic GPU lowering (Hopper): the contiguous kernel
(``pallas_kernels.decode_mgpu``) with each K/V block of its ring filled page by page through the block table.

Same call shape and semantics as :func:`pallas_kernels.paged.paged_decode_attention`: ``q [B, N, D]``; pools
``k_pages``, ``v_pages`` either ``[P, K, page_size, D]`` or all layers ``[L, P, K, page_size, D]`` with ``layer``
(int or traced int32 scalar); ``block_tables int32[B, M]``; ``lengths int[B]`` (0 gives zeros). Position ``s`` of
sequence ``b`` is row ``s % page_size`` of page ``block_tables[b, s // page_size]``; query head ``n`` reads kv
head ``n // G``; softmax in float32; the output has ``q.dtype``. Arguments are validated by
``pallas_kernels.paged.check_args`` plus what the MMA needs (:func:`paged_mgpu_unsupported_reason`).

The kernel is the contiguous one's (one warpgroup per ``(split, kv head, b)``, the kv head's ``G`` query heads as
rows of a 64-row query tile in registers, a ``num_stages``-slot TMA ring of ``block_k = 64`` positions, ``wgmma``
for ``q @ K^T`` and ``p @ V``, online softmax in base 2, split-K partials merged by
``pallas_kernels.common.merge_partials``), except how a ring slot is filled:

* block ``t`` covers positions ``t * 64 .. t * 64 + 63`` (no block slides back: the slot is always whole). With
  ``page_size <= 64`` it is ``64 / page_size`` TMA copies of whole pages into consecutive rows of the slot; with
  larger pages one copy of 64 rows from inside one page. All copies of a slot arrive on the slot's barrier.
* the page indices are scalar reads of the table in global memory. A copy whose page lies past the sequence's
  last page (``(lengths[b] - 1) // page_size``) copies that last page instead: the rows land at positions past
  the length, which are masked, so the kernel only ever reads pages the sequence's table names within its
  length, never an entry past it (which may be -1, stale, or another sequence's page). Entries within the length
  are range-checked on the host when concrete; traced ones are clamped into the pool.
* as in the contiguous kernel, scores past the length are masked to -inf and, in the block that ends past it, V
  rows past it are zeroed in shared memory before the MMA (unused slots may hold NaN).

Supported: bf16/f16 pools (the 16-bit MMA inputs; float32 pools: the Triton kernel), ``D`` in 64/128/256, ``G``
up to 64, ``page_size`` a power of two >= 8 (a TMA copy lands on whole 8-row tiles of the slot). Launch
parameters: :func:`paged_mgpu_config` (the contiguous kernel's rule on the table's capacity), overridable per call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, common, decode_mgpu, paged
from pallas_kernels.decode_mgpu import LOG2E, ROWS, STATS, MgpuConfig

MIN_PAGE = 8  # a TMA copy writes whole 8-row tiles of the swizzled slot


def paged_mgpu_config(
    batch: int,
    num_kv_heads: int,
    max_pages: int,
    page_size: int,
    head_dim: int,
    dtype,
    *,
    num_multiprocessors: int | None = None,
) -> MgpuConfig:
    """Default launch parameters: :func:`pallas_kernels.decode_mgpu.mgpu_config` for a contiguous cache of the
    table's capacity ``max_pages * page_size`` (the same blocks, splits and ring)."""
    max_len = max_pages * page_size
    return decode_mgpu.mgpu_config(
        batch, num_kv_heads, max_len, head_dim, dtype, num_multiprocessors=num_multiprocessors
    )


def paged_mgpu_unsupported_reason(num_q_heads: int, num_kv_heads: int, page_size: int, head_dim: int, dtype):
    """Why this kernel cannot take these heads, page size, head_dim and pool dtype (None: it can), any machine."""
    if jnp.dtype(dtype) not in decode_mgpu.CACHE_DTYPES:
        names = [str(t) for t in decode_mgpu.CACHE_DTYPES]
        return f"the Mosaic GPU paged kernel takes {names} pools (16-bit MMA inputs), got {jnp.dtype(dtype)}"
    if head_dim not in decode_mgpu.HEAD_DIMS:
        return f"head_dim={head_dim} is not supported by the Mosaic GPU kernel; expected one of {decode_mgpu.HEAD_DIMS}"
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}"
    if num_q_heads // num_kv_heads > ROWS:
        group = num_q_heads // num_kv_heads
        return (
            f"num_q_heads={num_q_heads} // num_kv_heads={num_kv_heads} = {group} query heads per kv head exceeds {ROWS}"
        )
    if page_size < MIN_PAGE or page_size & (page_size - 1):
        return f"page_size={page_size} must be a power of two >= {MIN_PAGE} for the Mosaic GPU kernel (TMA tiles)"
    return None


def block_copies(t, n, *, block_k: int, page_size: int) -> list:
    """The TMA copies that fill block ``t`` of a sequence of ``n > 0`` positions: per copy, in slot order, the
    logical page (table column) and the first row read in it; each copy reads ``min(block_k, page_size)`` rows.
    Pages past the sequence's last one are replaced by its last page (their rows are masked). ``t`` and ``n``
    may be traced int32 scalars or Python ints."""
    rows, ps = min(block_k, page_size), jnp.int32(page_size)
    last = lax.div(jnp.asarray(n, jnp.int32) - 1, ps)  # the sequence's last page with a position
    copies = []
    for c in range(max(1, block_k // page_size)):
        first = jnp.asarray(t, jnp.int32) * block_k + c * rows
        copies.append((jnp.minimum(lax.div(first, ps), last), lax.rem(first, ps)))
    return copies


# ----------------------------------------------------------------------------------------------- kernel


def _kernel(
    # inputs
    lengths_ref,  # [B] int32
    layer_ref,  # [1] int32
    tables_ref,  # [B * M] int32: the block table, flattened
    q_ref,  # [R, D]: the queries, one row per (b, query head), R = B * N rounded up to a multiple of 8
    k_ref,  # [L, P, K, page_size, D]: the whole pool; a program reads the pages its sequence's table names
    v_ref,  # [L, P, K, page_size, D]
    # outputs: o [B, N, D] (one split); or acc [B, K, Pp, G, D] and stats [B, K, Pp, G, STATS] (float32; stats
    # column 0 the running max, column 1 the softmax denominator)
    *out_refs,
    group: int,
    pages_per_seq: int,
    block_k: int,
    num_splits: int,
    num_stages: int,
    scale: float,
):
    plgpu = backend.mosaic_gpu_module()
    wgmma_layout = plgpu.Layout.WGMMA
    j, h, b = lax.axis_index("split"), lax.axis_index("kv_head"), lax.axis_index("batch")
    num_layers, num_pages, num_kv_heads, page_size, head_dim = k_ref.shape
    dtype = k_ref.dtype
    # Lengths, layer and table entries were validated on the host when concrete; the clamps keep traced ones in bounds.
    n = jnp.minimum(jnp.maximum(lengths_ref[b], 0), pages_per_seq * page_size)
    layer = jnp.minimum(jnp.maximum(layer_ref[0], 0), num_layers - 1)
    lo, hi = common.split_blocks(n, j, block_k, num_splits)
    steps = jnp.maximum(hi - lo, 0)
    rows_per_copy = min(block_k, page_size)

    # The query window, as in decode_mgpu: this kv head's G rows sit at `offset` in up to 64 rows of q from the
    # multiple of 8 at or below its first row (tiled TMA copies start on 8-row tiles); other rows are zeroed.
    first_row = b * (num_kv_heads * group) + h * group
    window_row = pl.multiple_of(lax.div(first_row, jnp.int32(8)) * 8, 8)
    offset = first_row - window_row  # 0..7

    def ring(q_smem, k_smem, v_smem, q_barrier, k_barriers, v_barriers):
        # q_smem [ROWS, D]; k_smem, v_smem [stages, bk, D]; one barrier per ring slot and operand
        def fetch(ref, smem, barriers, t, slot):  # K or V of block t into a ring slot, one copy per page
            for c, (column, row) in enumerate(block_copies(t, n, block_k=block_k, page_size=page_size)):
                entry = tables_ref[b * pages_per_seq + column]
                page = jnp.minimum(jnp.maximum(entry, 0), num_pages - 1)
                src = ref.at[layer, page, h]  # [page_size, D]
                if rows_per_copy < page_size:  # 64 rows from inside a larger page
                    src = src.at[pl.ds(pl.multiple_of(row, rows_per_copy), rows_per_copy)]
                dst = smem.at[slot, pl.ds(c * rows_per_copy, rows_per_copy)]
                plgpu.copy_gmem_to_smem(src, dst, barriers.at[slot])

        fetch_k = functools.partial(fetch, k_ref, k_smem, k_barriers)
        fetch_v = functools.partial(fetch, v_ref, v_smem, v_barriers)

        # The query window and the first K/V blocks are all in flight before the program waits for any.
        q_window = min(ROWS, q_ref.shape[0])
        q_dst = q_smem if q_window == ROWS else q_smem.at[pl.ds(0, q_window)]
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(window_row, q_window)], q_dst, q_barrier.at[0])
        for i in range(num_stages):

            @pl.when(i < steps)
            def _prefetch(i=i):
                fetch_k(lo + i, i)
                fetch_v(lo + i, i)

        plgpu.barrier_wait(q_barrier.at[0])
        q = q_smem[...]  # [ROWS, D], the MMA register layout
        q_rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, head_dim), 0, layout=wgmma_layout)
        q = jnp.where((q_rows >= offset) & (q_rows < offset + group), q, 0).astype(dtype)

        def step(i, carry):
            acc, m, denom = carry  # [ROWS, D], [ROWS], [ROWS] float32 (m in base-2 units)
            t = lo + i
            slot = lax.rem(i, jnp.int32(num_stages))
            start = t * block_k

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
            s = jnp.where(pos < n, s * (scale * LOG2E), -jnp.inf)
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

            acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot]))(
                plgpu.ACC.init(acc)
            )

            @pl.when(i + num_stages < steps)
            def _refill_v():  # the second MMA reading this slot has completed (its result was read)
                plgpu.commit_smem()
                fetch_v(t + num_stages, slot)

            return acc, m_new, denom

        init = (
            plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), wgmma_layout),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), wgmma_layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), wgmma_layout.reduce(1)),
        )
        return lax.fori_loop(0, steps, step, init)

    copies = max(1, block_k // page_size)  # TMA copies per K or V block, all on the slot's barrier
    acc, m, denom = pl.run_scoped(
        ring,
        plgpu.SMEM((ROWS, head_dim), q_ref.dtype, transforms=decode_mgpu._swizzled(q_ref.dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=decode_mgpu._swizzled(dtype)),
        plgpu.SMEM((num_stages, block_k, head_dim), dtype, transforms=decode_mgpu._swizzled(dtype)),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=copies, num_barriers=num_stages),
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


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _paged_decode(q, k_pages, v_pages, tables, lengths, layer, *, scale: float, config: MgpuConfig):
    # q [B, N, D]; k_pages, v_pages [L, P, K, page_size, D]; tables int32[B, M]; lengths int32[B]; layer int32[1]
    plgpu = backend.mosaic_gpu_module()
    kv_heads, _, head_dim = k_pages.shape[2:]
    batch, pages_per_seq = tables.shape
    group = q.shape[1] // kv_heads
    splits = config.num_splits
    if splits == 1:
        out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        rows = common.partial_rows(splits)  # the kernel writes the first `splits`
        out_type = (
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, kv_heads, rows, group, STATS), jnp.float32),  # m, denom
        )
    body = functools.partial(
        _kernel,
        group=group,
        pages_per_seq=pages_per_seq,
        block_k=config.block_k,
        num_splits=splits,
        num_stages=config.num_stages,
        scale=scale,
    )

    def jkv_paged_decode_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    q_rows = q.reshape(-1, head_dim)  # [B * N, D], a free reshape
    padded = decode_mgpu._round_up(q_rows.shape[0], 8)
    if padded != q_rows.shape[0]:  # whole 8-row tiles (a copy of q; only where B * N is not a multiple of 8)
        q_rows = jnp.pad(q_rows, ((0, padded - q_rows.shape[0]), (0, 0)))
    outs = plgpu.kernel(
        jkv_paged_decode_attention_mgpu,
        out_type=out_type,
        grid=(splits, kv_heads, batch),
        grid_names=("split", "kv_head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, layer, tables.reshape(-1), q_rows, k_pages, v_pages)
    if splits == 1:
        return outs
    acc, stats = outs
    flat = lambda x: x.reshape(batch * kv_heads, *x.shape[2:])  # free reshapes
    out = common.merge_partials(flat(acc), flat(stats), splits=splits, dtype=q.dtype, interpret=False)
    return out.reshape(q.shape)


# ----------------------------------------------------------------------------------------------- public


def check_paged_mgpu_args(q, k_pages, v_pages, block_tables, lengths, layer=None):
    """``pallas_kernels.paged.check_args``, then what this kernel adds (:func:`paged_mgpu_unsupported_reason`);
    returns ``(B, N, K, P, page_size, D)``."""
    b, n, kh, num_pages, page_size, d = paged.check_args(q, k_pages, v_pages, block_tables, lengths, layer)
    reason = paged_mgpu_unsupported_reason(n, kh, page_size, d, k_pages.dtype)
    if reason is not None:
        raise (TypeError if jnp.dtype(k_pages.dtype) not in decode_mgpu.CACHE_DTYPES else ValueError)(reason)
    return b, n, kh, num_pages, page_size, d


def paged_decode_attention_mgpu(
    q: Float[Array, "B N D"],
    k_pages: Float[Array, "*L P K page D"],
    v_pages: Float[Array, "*L P K page D"],
    block_tables: Int[Array, "B M"],
    lengths: Int[Array, " B"],
    *,
    layer=None,
    scale: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_stages: int | None = None,
) -> Float[Array, "B N D"]:
    """Decode attention of one query per sequence over its first ``lengths[b]`` positions, read through the block
    table (Mosaic GPU; see the module doc).

    ``layer`` selects the layer of ``[L, P, K, page_size, D]`` pools inside the kernel (no copy of a layer).
    ``scale`` defaults to ``D ** -0.5``. ``block_k``, ``num_splits`` and ``num_stages`` override
    :func:`paged_mgpu_config`. Raises ``RuntimeError`` where Mosaic GPU cannot run (no Hopper GPU, or a JAX build
    without ``jax.experimental.pallas.mosaic_gpu``): this kernel has no interpret mode.

    Example: two sequences of 20 and 3 positions in pages of 16::

        out = paged_decode_attention_mgpu(q, k_pages, v_pages, jnp.array([[4, 0], [2, -1]]), jnp.array([20, 3]))
    """
    b, _, kh, _, page_size, d = check_paged_mgpu_args(q, k_pages, v_pages, block_tables, lengths, layer)
    if not backend.mosaic_gpu_usable():
        reason = backend.mosaic_gpu_unavailable_reason()
        raise RuntimeError(f"the Mosaic GPU paged decode kernel cannot run here: {reason}")
    scale = common.softmax_scale(scale, d)
    config = decode_mgpu._resolve_config(
        paged_mgpu_config(b, kh, block_tables.shape[1], page_size, d, k_pages.dtype),
        d,
        jnp.dtype(k_pages.dtype).itemsize,
        block_k=block_k,
        num_splits=num_splits,
        num_stages=num_stages,
    )
    if block_tables.shape[1] == 0:  # no sequence can hold a position (lengths are 0): nothing to launch
        return jnp.zeros(q.shape, q.dtype)
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0  # a free reshape, not a copy
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    tables = jnp.asarray(block_tables).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _paged_decode(q, k_pages, v_pages, tables, lengths, layer, scale=float(scale), config=config)
