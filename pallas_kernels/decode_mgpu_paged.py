"""Decode attention over a paged KV cache with the Mosaic GPU lowering (Hopper): the kernel body of
``pallas_kernels.decode_mgpu_kernel`` (shared with ``decode_mgpu``) with each K/V block of its ring filled page by
page through the block table.

Same call shape and semantics as :func:`pallas_kernels.paged.paged_decode_attention`: ``q [B, N, D]``; pools
``k_pages``, ``v_pages`` either ``[P, K, page_size, D]`` or all layers ``[L, P, K, page_size, D]`` with ``layer``
(int or traced int32 scalar); ``block_tables int32[B, M]``; ``lengths int[B]`` (0 gives zeros). Position ``s`` of
sequence ``b`` is row ``s % page_size`` of page ``block_tables[b, s // page_size]``; query head ``n`` reads kv
head ``n // G``; softmax in float32; the output has ``q.dtype``. Arguments are validated by
``pallas_kernels.paged.check_args`` plus what the MMA needs (:func:`paged_mgpu_unsupported_reason`).

The kernel is ``decode_mgpu_kernel``'s (one warpgroup per ``(split, kv head, b)``, the kv head's ``G`` query heads as
rows of a 64-row query tile in shared memory, a ``num_stages``-slot TMA ring of ``block_k = 64`` positions, ``wgmma``
for ``q @ K^T`` and ``p @ V``, online softmax in base 2, split-K partials merged by
``pallas_kernels.common.merge_partials``); this module gives it how a ring slot is filled (:func:`_fill`):

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

from pallas_kernels import backend, checks, common, decode_mgpu, mgpu_common, paged
from pallas_kernels import decode_mgpu_kernel as kernel
from pallas_kernels.decode_mgpu import MgpuConfig

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
    """Why this kernel cannot take these heads, page size, head_dim and pool dtype (None: it can), any machine:
    ``decode_mgpu.unsupported_reason``, and pages the TMA tiles."""
    if (reason := decode_mgpu.unsupported_reason(num_q_heads, num_kv_heads, head_dim, dtype)) is not None:
        return reason
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


def _fill(program, ref, smem, barriers, t, slot, *, tables_ref, pages_per_seq: int, block_k: int):
    """A :data:`pallas_kernels.decode_mgpu_kernel.SlotFill`: block ``t`` page by page through the block table
    (:func:`block_copies`), each copy's page clamped into the pool."""
    plgpu = backend.mosaic_gpu_module()
    num_pages, page_size = ref.shape[1], ref.shape[3]
    rows_per_copy = min(block_k, page_size)
    for c, (column, row) in enumerate(block_copies(t, program.n, block_k=block_k, page_size=page_size)):
        entry = tables_ref[program.b * pages_per_seq + column]
        page = jnp.minimum(jnp.maximum(entry, 0), num_pages - 1)
        src = ref.at[program.layer, page, program.h]  # [page_size, D]
        if rows_per_copy < page_size:  # 64 rows from inside a larger page
            src = src.at[pl.ds(pl.multiple_of(row, rows_per_copy), rows_per_copy)]
        dst = smem.at[slot, pl.ds(c * rows_per_copy, rows_per_copy)]
        plgpu.copy_gmem_to_smem(src, dst, barriers.at[slot])


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _paged_decode(q, k_pages, v_pages, tables, lengths, layer, *, scale: float, config: MgpuConfig):
    # q [B, N, D]; k_pages, v_pages [L, P, K, page_size, D]; tables int32[B, M]; lengths int32[B]; layer int32[1]
    kv_heads, page_size, _ = k_pages.shape[2:]
    batch, pages_per_seq = tables.shape
    block_k = config.block_k
    body = functools.partial(
        kernel.kernel,
        ring=kernel.Ring(capacity=pages_per_seq * page_size, slides=False, copies=max(1, block_k // page_size)),
        group=q.shape[1] // kv_heads,
        block_k=block_k,
        num_splits=config.num_splits,
        num_stages=config.num_stages,
        scale=scale,
    )

    def jkv_paged_decode_attention_mgpu(lengths_ref, layer_ref, tables_ref, *refs):  # the name in profiles
        fill = functools.partial(_fill, tables_ref=tables_ref, pages_per_seq=pages_per_seq, block_k=block_k)
        body(lengths_ref, layer_ref, *refs, fill=fill)

    named = jkv_paged_decode_attention_mgpu
    return kernel.launch(named, q, (k_pages, v_pages), lengths, layer, tables, batch=batch, splits=config.num_splits)


# ----------------------------------------------------------------------------------------------- public


def check_paged_mgpu_args(q, k_pages, v_pages, block_tables, lengths, layer=None):
    """``pallas_kernels.paged.check_args``, then what this kernel adds (:func:`paged_mgpu_unsupported_reason`);
    returns ``(B, N, K, P, page_size, D)``."""
    b, n, kh, num_pages, page_size, d = paged.check_args(q, k_pages, v_pages, block_tables, lengths, layer)
    mgpu_common.refuse(paged_mgpu_unsupported_reason(n, kh, page_size, d, k_pages.dtype), k_pages.dtype)
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
    scale = checks.softmax_scale(scale, d)
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
    (k_pages, v_pages), layer = common.whole_cache((k_pages, v_pages), layer)
    tables = jnp.asarray(block_tables).astype(jnp.int32)
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _paged_decode(q, k_pages, v_pages, tables, lengths, layer, scale=float(scale), config=config)
