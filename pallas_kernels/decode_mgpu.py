"""Decode attention over a contiguous KV cache with the Mosaic GPU lowering (Hopper): TMA ring + warpgroup MMAs.

Same call shape and semantics as :func:`pallas_kernels.decode.decode_attention`: ``q [B, N, D]``;
``k``, ``v`` either ``[B, K, S, D]`` or a whole ``[L, B, K, S, D]`` cache with ``layer`` (int or traced int32
scalar); ``lengths int[B]`` (0 gives zeros); query head ``n`` reads kv head ``n // G``; softmax in float32; the
output has ``q.dtype``. The arguments are validated by ``pallas_kernels.checks.check_args``, and the split-K
partials are merged by ``pallas_kernels.common.merge_partials``.

The kernel (``jax.experimental.pallas.mosaic_gpu``; Hopper and later, no interpret mode) is
``pallas_kernels.decode_mgpu_kernel``'s (one warpgroup per ``(split, kv head, b)``, a TMA ring of K/V blocks,
``wgmma`` for ``q @ K^T`` and ``p @ V``, online softmax in base 2, split-K partials) with each ring slot filled by
one TMA copy of ``block_k`` consecutive positions; a block that would run past ``S`` slides back to end at ``S``
(positions already counted are masked).

Launch parameters come from :func:`mgpu_config` and can be overridden per call. Measured against the Triton
kernel and torch in docs/notes/decode_kernel.md; where the dispatch takes it: ``pallas_kernels.dispatch``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import backend, checks, common, mgpu_common
from pallas_kernels import decode_mgpu_kernel as kernel
from pallas_kernels.mgpu_common import MGPU_SMEM_RESERVE, ROWS, round_up

BLOCK_K = 64  # 128 compiled and ran but gave wrong results on jax 0.11.2 (see docs/notes/decode_kernel.md)
DEFAULT_STAGES = 2


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


def _fill(program, ref, smem, barriers, t, slot, *, block_k: int, max_len: int):
    """A :data:`pallas_kernels.decode_mgpu_kernel.SlotFill`: one TMA copy of block ``t``, slid back to end
    inside ``S``."""
    plgpu = backend.mosaic_gpu_module()
    rows = pl.ds(kernel.block_start(t, block_k=block_k, capacity=max_len), block_k)
    plgpu.copy_gmem_to_smem(ref.at[program.layer, program.b, program.h, rows], smem.at[slot], barriers.at[slot])


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _decode(q, k, v, lengths, layer, *, scale: float, config: MgpuConfig):
    # q [B, N, D]; k, v [L, B, K, S, D] (S a multiple of 8, >= block_k); lengths int32[B]; layer int32[1]
    _, batch, kv_heads, max_len, _ = k.shape
    body = functools.partial(
        kernel.kernel,
        fill=functools.partial(_fill, block_k=config.block_k, max_len=max_len),
        ring=kernel.Ring(capacity=max_len, slides=True, copies=1),
        group=q.shape[1] // kv_heads,
        block_k=config.block_k,
        num_splits=config.num_splits,
        num_stages=config.num_stages,
        scale=scale,
    )

    def jkv_decode_attention_mgpu(*refs):  # the kernel's name in profiles
        body(*refs)

    return kernel.launch(jkv_decode_attention_mgpu, q, (k, v), lengths, layer, batch=batch, splits=config.num_splits)


# ----------------------------------------------------------------------------------------------- public


def _resolve_config(default: MgpuConfig, head_dim: int, itemsize: int, **overrides) -> MgpuConfig:
    for name, value in overrides.items():
        if value is not None and not checks.is_int(value):
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


def unsupported_reason(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype) -> str | None:
    """Why the Mosaic GPU decode kernels (contiguous and paged) cannot take these heads, head_dim and cache dtype
    (None: they can), any machine: ``mgpu_common.unsupported_reason`` and a kv head's query heads within one
    64-row MMA tile."""
    if (reason := mgpu_common.unsupported_reason(num_q_heads, num_kv_heads, head_dim, dtype)) is not None:
        return reason
    group = num_q_heads // num_kv_heads
    if group > ROWS:
        return (
            f"num_q_heads={num_q_heads} // num_kv_heads={num_kv_heads} = {group} query heads per kv head exceeds {ROWS}"
        )
    return None


def check_mgpu_args(q, k, v, lengths, layer=None) -> tuple[int, int, int, int, int]:
    """``pallas_kernels.checks.check_args``, then what this kernel adds (:func:`unsupported_reason`)."""
    b, n, kh, s, d = checks.check_args(q, k, v, lengths, layer)
    mgpu_common.refuse(unsupported_reason(n, kh, d, k.dtype), k.dtype)
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
    scale = checks.softmax_scale(scale, d)
    itemsize = jnp.dtype(k.dtype).itemsize
    config = _resolve_config(
        mgpu_config(b, kh, s, d, k.dtype),
        d,
        itemsize,
        block_k=block_k,
        num_splits=num_splits,
        num_stages=num_stages,
    )
    # A tiny cache, or S off the 8-row tile, is padded (a copy of the cache; never at usual sizes).
    (k, v), layer = common.whole_cache((k, v), layer, max(config.block_k, round_up(s, 8)))
    lengths = jnp.asarray(lengths).astype(jnp.int32)
    return _decode(q, k, v, lengths, layer, scale=float(scale), config=config)
