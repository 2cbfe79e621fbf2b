"""Multi-token attention over a contiguous KV cache with the Mosaic GPU lowering (Hopper): prefill, prompt chunks
and speculative verification as one flash-attention kernel (issue 20; docs/attention.md).

``q [T, N, D]`` is a flat batch of query tokens; sequence ``b``'s ``counts[b]`` queries are rows
``q_starts[b] ..`` at positions ``lengths[b] ..``, their K/V already written to the cache. Query ``i`` at position
``p`` attends causally to ``max(0, p - window + 1) <= s <= p``; query head ``n`` reads kv head ``n // G``; the
logits may be soft-capped (``c * tanh(x / c)``); rows no sequence owns give 0. Softmax in float32, output in
``q.dtype``. Plain 16-bit caches (bf16/f16, the MMA's inputs), ``D`` in 64/128/256.

The kernel (``jax.experimental.pallas.mosaic_gpu``; Hopper and later; its body in ``multi_token_mgpu_kernel``):

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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, checks, common
from pallas_kernels import multi_token_mgpu_kernel as kernel
from pallas_kernels.mgpu_common import MGPU_SMEM_RESERVE, ROWS, refuse, round_up, unsupported_reason
from pallas_kernels.multi_token_tiles import ALIGN, check_args, tile_table

BLOCK_KS = (64, 128)  # 64: the decode kernel's verified block; 128 only measured against it (see the docs)


class MgpuMultiTokenConfig(NamedTuple):
    """Launch parameters (static: each distinct value compiles its own kernel)."""

    block_q: int  # query tokens per tile (a multiple of 8); block_q * heads_per_tile = ROWS
    heads_per_tile: int  # query heads of one kv head per tile (divides G)
    block_k: int  # key positions per ring slot (BLOCK_KS)
    num_stages: int  # ring slots: K/V blocks in flight per program
    # the warp-specialised kernels' two consumers take turns at the tensor cores, one's softmax overlapping the
    # other's MMAs (multi_token_mgpu_ws); the one-warpgroup kernels refuse it
    pingpong: bool = False


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


def smem_need(config: MgpuMultiTokenConfig, head_dim: int, dtype, out_dtype, consumers=1) -> tuple[int, int]:
    """``(bytes, budget)``: one program's shared memory (:func:`smem_bytes`) and what the default GPU offers it (read
    from the device: :func:`backend.shared_memory_per_block`, less what Mosaic GPU keeps for itself)."""
    need = smem_bytes(config, head_dim, jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize, consumers)
    return need, backend.shared_memory_per_block() - MGPU_SMEM_RESERVE


def fits(config: MgpuMultiTokenConfig, head_dim: int, dtype, out_dtype, consumers=1) -> bool:
    """Whether one program of ``config`` fits the default GPU's shared memory (:func:`smem_need`)."""
    need, budget = smem_need(config, head_dim, dtype, out_dtype, consumers)
    return need <= budget


mgpu_unsupported_reason = unsupported_reason  # nothing the multi-token kernels add


def mgpu_supported(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> bool:
    """Whether :func:`multi_token_attention_mgpu` takes these heads, head_dim and cache dtype (any T, B, S, G)."""
    return mgpu_unsupported_reason(num_q_heads, num_kv_heads, head_dim, dtype) is None


# ----------------------------------------------------------------------------------------------- kernel


@functools.partial(jax.jit, static_argnames=("scale", "window", "softcap", "config", "pages_per_seq"))
def _attend(q, k, v, pages, q_starts, lengths, counts, layer, *, scale, window, softcap, config, pages_per_seq=None):
    # q [T, N, D]; k, v [L, B, K, S, D] (S a multiple of 8, >= block_k) or pools [L, P, K, page_size, D] with
    # pages int32[B * M] (else unused); q_starts, lengths, counts int32[B]; layer int32[1]
    num_rows, num_heads, _ = q.shape
    group = num_heads // k.shape[2]
    table = tile_table(
        q_starts, lengths, counts, num_rows=num_rows, block_q=config.block_q, block_k=config.block_k, window=window
    )
    options = dict(scale=scale, window=window, softcap=softcap, pages_per_seq=pages_per_seq)
    body = functools.partial(kernel.kernel, config=config, group=group, **options)

    def jkv_multi_token_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    return launch(jkv_multi_token_attention_mgpu, table, layer, q, k, v, pages=pages, config=config)


def launch(kernel_fn, table, layer, q, k, v, *, config, pages=None, **options):
    """``plgpu.kernel`` of a multi-token kernel body over ``(table, layer, [pages,] q, k, v)`` on the grid
    ``(N / heads_per_tile, tiles)``: ``q`` in the cache's dtype (the MMA's), padded to whole 8-row tiles (a copy
    only where needed; the step's token buckets are multiples of 8), the output cut back to ``T`` rows."""
    plgpu = backend.mosaic_gpu_module()
    num_rows, num_heads, head_dim = q.shape
    rows = round_up(num_rows, ALIGN)
    q_in = q.astype(k.dtype)  # the MMA takes the cache's dtype (a copy of q only where they differ)
    if rows != num_rows:  # whole 8-row tiles (a copy of q; the step's token buckets are multiples of 8)
        q_in = jnp.pad(q_in, ((0, rows - num_rows), (0, 0), (0, 0)))
    out = plgpu.kernel(
        kernel_fn,
        out_type=jax.ShapeDtypeStruct((rows, num_heads, head_dim), q.dtype),
        grid=(num_heads // config.heads_per_tile, table.shape[0]),
        grid_names=("heads", "tile"),
        **options,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(table.reshape(-1), layer, *(() if pages is None else (pages,)), q_in, k, v)
    return out if rows == num_rows else out[:num_rows]


# ----------------------------------------------------------------------------------------------- public


def check_mgpu_args(q, k, v, q_starts, lengths, counts, layer=None, *, window=None, softcap=None):
    """``multi_token_tiles.check_args``, then what this kernel adds (:func:`mgpu_unsupported_reason`)."""
    t, n, kh, s, d = check_args(q, k, v, q_starts, lengths, counts, layer, window=window, softcap=softcap)
    refuse(mgpu_unsupported_reason(n, kh, d, k.dtype), k.dtype)
    return t, n, kh, s, d


def resolve_config(config, num_heads, kv_heads, head_dim, dtype, out_dtype, consumers=1) -> MgpuMultiTokenConfig:
    """``config`` (None: :func:`mgpu_multi_token_config`), checked against the MMA and shared memory."""
    if config is None:
        config = mgpu_multi_token_config(num_heads, kv_heads, head_dim, dtype)
    if not isinstance(config, MgpuMultiTokenConfig):
        raise TypeError(f"config must be an MgpuMultiTokenConfig or None, got {config!r}")
    for name, value in config._asdict().items():
        if name == "pingpong":
            if not isinstance(value, bool):
                raise TypeError(f"config.pingpong={value!r} must be a bool")
        elif not checks.is_int(value) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive int")
    if config.pingpong and consumers != 2:
        raise ValueError(f"config.pingpong=True takes two consumer warpgroups (multi_token_mgpu_ws*), not {consumers}")
    if config.block_q * config.heads_per_tile != ROWS or config.block_q % ALIGN:
        raise ValueError(
            f"config.block_q={config.block_q} x heads_per_tile={config.heads_per_tile} must be {ROWS} rows, "
            f"block_q a multiple of {ALIGN}"
        )
    if (num_heads // kv_heads) % config.heads_per_tile:
        raise ValueError(f"config.heads_per_tile={config.heads_per_tile} must divide G={num_heads // kv_heads}")
    if config.block_k not in BLOCK_KS:
        raise ValueError(f"config.block_k={config.block_k} must be one of {BLOCK_KS}")
    need, budget = smem_need(config, head_dim, dtype, out_dtype, consumers)
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
    require_mosaic_gpu()
    options = static_options(scale, d, window, softcap, config)
    k, v, layer = whole_cache(k, v, layer, config.block_k)
    return _attend(q, k, v, jnp.zeros((1,), jnp.int32), q_starts, lengths, counts, layer, **options)


def require_mosaic_gpu() -> None:
    """Raise ``RuntimeError`` where Mosaic GPU cannot run: the multi-token kernels have no interpret mode."""
    if not backend.mosaic_gpu_usable():
        raise RuntimeError(
            f"the Mosaic GPU multi-token kernel cannot run here: {backend.mosaic_gpu_unavailable_reason()}"
        )


def static_options(scale, head_dim: int, window, softcap, config) -> dict:
    """The kernel's static arguments: the softmax scale resolved, ``softcap`` a Python float."""
    softcap = None if softcap is None else float(softcap)
    return dict(scale=checks.softmax_scale(scale, head_dim), window=window, softcap=softcap, config=config)


def whole_cache(k, v, layer, block_k: int):
    """``k``, ``v`` as whole ``[L, B, K, S, D]`` caches (a one-layer cache: a free reshape) with ``S`` padded to
    whole 8-row tiles and at least ``block_k`` positions (a copy, never at usual sizes), ``layer`` as ``int32[1]``."""
    (k, v), layer = common.whole_cache((k, v), layer, max(block_k, round_up(k.shape[-2], ALIGN)))
    return k, v, layer
